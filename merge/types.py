"""Shared types of the merge layer: an adapter state and one peer's contribution to a merge."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

# A LoRA adapter as exchanged between peers: peft state-dict names (no adapter name inside,
# as `get_peft_model_state_dict` returns them) mapped to CPU tensors. LoRA factors come in
# pairs `<prefix>.lora_A.weight` (r x d_in) and `<prefix>.lora_B.weight` (d_out x r).
AdapterState = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Contribution:
    """One adapter offered to a merge, with what its sender says about it.

    Attributes:
        state: the adapter tensors.
        samples: training samples the adapter embodies (self-reported by neighbours, so rules
            must cap it before turning it into weight).
        age: staleness in adapter versions behind the freshest one known (0 = fresh).
        peer: the sender's peer id, for logs and per-peer buffers ("" for self).
    """

    state: Mapping[str, torch.Tensor]
    samples: int
    age: int = 0
    peer: str = ""

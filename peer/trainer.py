"""Local training of the LoRA factors on a peer's private batches.

`LocalTrainer` is driven from a worker thread (`trio.to_thread.run_sync`) one round at a time;
between rounds the daemon reads and replaces the adapter state on the event-loop thread, so the
swap always happens at a step boundary and no lock is needed.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict

from merge.types import AdapterState
from peer.config import TrainConfig
from peer.data import TokenBatches, mean_loss


class LocalTrainer:
    """Owns the peft model, its optimizer and the peer's batch stream.

    Args:
        model: a peft model whose only trainable parameters are the LoRA factors.
        batches: the private training stream.
        config: steps per round, learning rate.
        samples: training samples already embodied (when resuming from a checkpoint).
    """

    def __init__(self, model: Any, batches: TokenBatches, config: TrainConfig,
                 samples: int = 0) -> None:
        self.model = model
        self.batches = batches
        self.config = config
        self.samples = samples
        self._params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self._params, lr=config.lr, weight_decay=config.weight_decay
        )

    def train_round(self, stop: threading.Event | None = None) -> float:
        """Run `steps_per_round` optimizer steps; return their mean training loss.

        Args:
            stop: when set (by a signal handler), return after the current step.
        """
        self.model.train()
        losses: list[float] = []
        for _ in range(self.config.steps_per_round):
            if losses and stop is not None and stop.is_set():
                break
            batch = self.batches.next_batch()
            loss = self.model(**batch).loss
            if not math.isfinite(loss.item()):
                raise FloatingPointError("training loss is not finite; lower --lr")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self._params, 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            self.samples += int(batch["input_ids"].shape[0])
        return sum(losses) / len(losses)

    def state(self) -> AdapterState:
        """A detached CPU copy of the adapter (peft names, no adapter name inside).

        In frozen-A mode (FFA-LoRA) only the B factors are included: every peer's A is the
        swarm-seeded one, so exchanging B alone is complete, averaging it is exact
        (mean(B)·A = mean(B·A)), and the bytes on the wire shrink by A's share.
        """
        return {k: v.detach().to("cpu", copy=True).contiguous()
                for k, v in get_peft_model_state_dict(self.model).items()
                if not (self.config.frozen_a and "lora_A" in k)}

    def load_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Replace the adapter's values in place (the optimizer keeps its moments)."""
        result = set_peft_model_state_dict(self.model, dict(state))
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise KeyError(f"adapter state has keys the model lacks: {unexpected[:3]}")

    def eval_loss(self, batches: Sequence[dict[str, torch.Tensor]]) -> float:
        """Token-weighted mean loss on held-out batches."""
        return mean_loss(self.model, batches)

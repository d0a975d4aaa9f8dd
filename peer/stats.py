"""`PeerStatistics`: what a peer has done, for metrics.jsonl, status.json and its checkpoint.

Totals go on across restarts: a checkpoint keeps them, and a resumed peer adds to them. Each
counter has one owner: the node counts what it refused on the wire, the gatherer what failed
validation, and this record what the round loop did.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from peer.sketch import adapter_norm, sketch

# Totals a checkpoint carries that grow outside this record (bytes on the wire, time run).
_CARRIED = ("bytes_in", "bytes_out", "t")


@dataclass
class PeerStatistics:
    """Counters of one peer, over every run of its data folder."""

    merges: int = 0  # neighbour adapters merged
    adapters_received: int = 0  # fetched intact, valid or not
    rejected: Counter[str] = field(default_factory=Counter)  # failed validation, by reason
    last_eval: float | None = None
    last_train_loss: float = 0.0  # announced in settling rounds, which do not train
    train_s: float = 0.0  # seconds spent in training steps
    before: dict[str, float] = field(default_factory=dict)  # earlier runs' carried totals
    started: float = field(default_factory=time.monotonic)

    @classmethod
    def resumed(cls, counters: Mapping[str, float]) -> PeerStatistics:
        """Continue the totals that a restarted peer's checkpoint kept."""
        return cls(merges=int(counters.get("merges", 0)),
                   adapters_received=int(counters.get("adapters_received", 0)),
                   train_s=counters.get("t_train", 0.0),
                   before={k: counters.get(k, 0.0) for k in _CARRIED})

    def totals(self, *, bytes_in: int, bytes_out: int) -> dict[str, Any]:
        """Merges, adapters received, bytes each way, seconds run (`t`) and seconds spent in
        training steps (`t_train`), over every restart."""
        before = self.before
        return {
            "merges": self.merges, "adapters_received": self.adapters_received,
            "bytes_in": int(before.get("bytes_in", 0)) + bytes_in,
            "bytes_out": int(before.get("bytes_out", 0)) + bytes_out,
            "t": round(before.get("t", 0.0) + time.monotonic() - self.started, 3),
            "t_train": round(self.train_s, 3),
        }


def shape_of(state: Mapping[str, Any]) -> dict[str, Any]:
    """A 64-number sketch and the norm instead of the adapter: enough to measure consensus."""
    return {"sketch": [float(f"{x:.6g}") for x in sketch(state)],
            "norm": float(f"{adapter_norm(state):.6g}")}

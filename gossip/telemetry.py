"""Telemetry: what a peer says about itself in each announcement, for operators to watch.

A few figures ride on every announcement (`gossip.wire.Announcement.telemetry`): the round the
peer is in, its last eval loss, the kind of device it trains on, its LoRA rank and its merge
rule. With the announcement's own version, samples and train loss they make up one row of the
swarm table (`loraswarm swarm`), with no server: every member hears every announcement anyway.

All of it is self-reported: signed by the sender, so nobody else can forge it, but the sender
can say what it likes. It is shown, labelled so, and never feeds a merge weight. Like every
inbound field it is bounded and type-checked; a record that fails is refused with the reason
"bad_telemetry", together with the announcement that carried it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from gossip.errors import WireError

MAX_ROUND = 2**53
MAX_RANK = 4096  # LoraSettings allows 1..1024; a rank-free rule takes up to 4x ours
MAX_LOSS = 1e6  # far above any cross-entropy a peer reports (ln of a 10^6-token vocabulary is 14)
MAX_DEVICE_LEN = 16
MAX_RULE_LEN = 32
# Device kinds (cpu, cuda, mps, xpu, ...) and rule names are short lowercase words; nothing
# else may reach a log line or a terminal table.
_WORD = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_-")
KEYS = frozenset({"round", "eval_loss", "device", "rank", "merge_rule"})


def _bad(name: str, why: str) -> WireError:
    return WireError("bad_telemetry", f"{name}: {why}")


@dataclass(frozen=True)
class Telemetry:
    """One peer's self-reported figures, beside the version, samples and train loss that its
    announcement carries anyway.

    Attributes:
        round: rounds the peer had finished when it announced.
        eval_loss: its last held-out loss, or None (no eval data, or not evaluated yet).
        device: the kind of device its base runs on ("cpu", "cuda", "mps", ...).
        rank: its LoRA rank.
        merge_rule: the name of its merge rule.
    """

    round: int
    eval_loss: float | None
    device: str
    rank: int
    merge_rule: str

    def __post_init__(self) -> None:
        _check_int("round", self.round, 0, MAX_ROUND)
        if self.eval_loss is not None:
            value = self.eval_loss
            if type(value) is not float or not math.isfinite(value):
                raise _bad("eval_loss", f"expected a finite float or nil, got {value!r}"[:80])
            if not 0.0 <= value <= MAX_LOSS:
                raise _bad("eval_loss", f"{value} not in 0..{MAX_LOSS:g}")
        _check_word("device", self.device, MAX_DEVICE_LEN)
        _check_int("rank", self.rank, 1, MAX_RANK)
        _check_word("merge_rule", self.merge_rule, MAX_RULE_LEN)

    def to_wire(self) -> dict[str, Any]:
        """The msgpack map that travels in the announcement."""
        return asdict(self)

    @classmethod
    def from_wire(cls, value: object) -> Telemetry | None:
        """Check the `telemetry` field of a decoded announcement: nil, or an exact map.

        Raises:
            WireError: "bad_telemetry", with what is wrong.
        """
        if value is None:
            return None
        if not isinstance(value, Mapping):
            raise _bad("telemetry", f"expected a map or nil, got {type(value).__name__}")
        if value.keys() != KEYS:
            missing = sorted(KEYS - value.keys())
            unknown = sorted(repr(k)[:40] for k in value.keys() - KEYS)
            raise _bad("telemetry", f"missing {missing[:4]}, unknown {unknown[:4]}")
        return cls(**{str(key): item for key, item in value.items()})


def _check_int(name: str, value: object, lo: int, hi: int) -> None:
    if type(value) is not int:  # bool is an int subclass; msgpack keeps them apart
        raise _bad(name, f"expected int, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise _bad(name, f"{value} not in {lo}..{hi}")


def _check_word(name: str, value: object, max_len: int) -> None:
    if type(value) is not str:
        raise _bad(name, f"expected str, got {type(value).__name__}")
    if not 1 <= len(value) <= max_len or not _WORD.issuperset(value):
        raise _bad(name, f"not a word of 1..{max_len} characters a-z, 0-9, '_' or '-'")

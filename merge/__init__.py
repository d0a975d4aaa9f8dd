"""Pure merge rules over LoRA adapter states: no network, no trio, only torch."""

from __future__ import annotations

from merge.buffer import BufferStatistics, NeighbourBuffer
from merge.config import MergeConfig
from merge.errors import REJECT_REASONS, MergeConfigError, MergeError, RejectedUpdate
from merge.product import PairMerge, merge_pair, rescale_lora
from merge.rules import (
    RULES,
    MergeRule,
    accepts_rank_change,
    lora_pairs,
    merge_states,
    merge_weights,
    validate_update,
)
from merge.types import AdapterState, Contribution

__all__ = [
    "REJECT_REASONS",
    "RULES",
    "AdapterState",
    "BufferStatistics",
    "Contribution",
    "MergeConfig",
    "MergeConfigError",
    "MergeError",
    "MergeRule",
    "NeighbourBuffer",
    "PairMerge",
    "RejectedUpdate",
    "accepts_rank_change",
    "lora_pairs",
    "merge_pair",
    "merge_states",
    "merge_weights",
    "rescale_lora",
    "validate_update",
]

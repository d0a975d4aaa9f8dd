"""Pure merge rules over LoRA adapter states: no network, no trio, only torch."""

from __future__ import annotations

from merge.attack_sim import norm_growth_under_liar
from merge.buffer import BufferPlan, BufferStatistics, NeighbourBuffer, buffer_plan
from merge.config import MergeConfig
from merge.errors import REJECT_REASONS, MergeConfigError, MergeError, RejectedUpdate
from merge.product import PairMerge, merge_pair, rescale_lora
from merge.reference import NormReference, ReferenceStatistics
from merge.rules import (
    REGISTRY,
    RULES,
    MergeRule,
    RuleEntry,
    accepts_rank_change,
    lora_pairs,
    merge_states,
    merge_weights,
    needs_buffer,
    validate_update,
)
from merge.tensors import state_norm
from merge.types import AdapterState, Contribution

__all__ = [
    "REGISTRY",
    "REJECT_REASONS",
    "RULES",
    "AdapterState",
    "BufferPlan",
    "BufferStatistics",
    "Contribution",
    "MergeConfig",
    "MergeConfigError",
    "MergeError",
    "MergeRule",
    "NeighbourBuffer",
    "NormReference",
    "PairMerge",
    "ReferenceStatistics",
    "RejectedUpdate",
    "RuleEntry",
    "accepts_rank_change",
    "buffer_plan",
    "lora_pairs",
    "merge_pair",
    "merge_states",
    "merge_weights",
    "needs_buffer",
    "norm_growth_under_liar",
    "rescale_lora",
    "state_norm",
    "validate_update",
]

"""Pure merge rules over LoRA adapter states: no network, no trio, only torch."""

from __future__ import annotations

from merge.attack_sim import norm_growth_under_liar
from merge.buffer import BufferStatistics, NeighbourBuffer
from merge.config import MergeConfig
from merge.errors import REJECT_REASONS, MergeConfigError, MergeError, RejectedUpdate
from merge.product import PairMerge, merge_pair, rescale_lora
from merge.quorum import buffer_capacity, min_buffered, trim_count
from merge.reference import NormReference, ReferenceStatistics
from merge.registry import RULE_NAMES, RULES, MergeRule, Rule, rule
from merge.rules import merge_states
from merge.tensors import lora_pairs, state_norm
from merge.types import AdapterState, Contribution
from merge.validate import MAX_RANK_FACTOR, validate_update
from merge.weights import merge_weights

__all__ = [
    "MAX_RANK_FACTOR",
    "REJECT_REASONS",
    "RULES",
    "RULE_NAMES",
    "AdapterState",
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
    "Rule",
    "buffer_capacity",
    "lora_pairs",
    "merge_pair",
    "merge_states",
    "merge_weights",
    "min_buffered",
    "norm_growth_under_liar",
    "rescale_lora",
    "rule",
    "state_norm",
    "trim_count",
    "validate_update",
]

"""Exceptions of the merge layer.

A rejected neighbour update carries a short machine-readable `reason` (the daemon counts them per
reason) and a one-line human `detail`; `str(error)` is ``"reason: detail"``.
"""

from __future__ import annotations

REJECT_REASONS = frozenset({
    "keys_mismatch",  # tensor names differ from ours
    "shape_mismatch",  # a tensor of another shape (other than a LoRA rank change)
    "dtype_mismatch",  # another dtype, or not a floating-point tensor
    "norm_bound",  # norm, or distance from ours, above max_norm_ratio x the reference scale
    "rank_mismatch",  # LoRA factors of another rank for a rule that cannot merge them, or too high
})


class MergeError(Exception):
    """Base of every error raised by the `merge` package."""


class MergeConfigError(MergeError, ValueError):
    """A `MergeConfig` field is out of range (a ValueError, as for every config dataclass)."""


class RejectedUpdate(MergeError):
    """A neighbour's adapter failed validation and must not be merged.

    Attributes:
        reason: one of `REJECT_REASONS`.
        detail: what exactly was wrong, on one short line.
    """

    def __init__(self, reason: str, detail: str) -> None:
        # An unknown reason is a bug in our own code, not in the remote input: fail loudly.
        if reason not in REJECT_REASONS:
            raise ValueError(f"RejectedUpdate: unknown reason {reason!r}")
        detail = " ".join(str(detail).split())[:300]
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self) -> tuple[type[RejectedUpdate], tuple[str, str]]:
        # Keep the two-argument constructor working through copy and pickling of the exception.
        return (type(self), (self.reason, self.detail))

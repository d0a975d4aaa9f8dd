"""The DP settings of a peer (`--dp-*`, `--require-dp`), checked without torch or an accountant.

`peer.privacy` turns them into σ and keeps the ledger; this module stays light so that the
command line can describe and check them at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from peer.accounting import ACCOUNTANTS, MAX_NOISE


@dataclass(frozen=True)
class PrivacyConfig:
    """DP-SGD for this peer's own steps, and what it asks of neighbours before merging them."""

    epsilon: float | None = field(default=None, metadata={
        "help": "train with DP-SGD and stop training once this ε is spent (the peer keeps "
        "serving and merging); off when not given"})
    delta: float = field(default=1e-5, metadata={
        "help": "δ of the (ε, δ) guarantee; must be below 1 / the number of training examples"})
    clip: float = field(default=1.0, metadata={
        "help": "per-example gradient norm bound C of DP-SGD"})
    noise: float | None = field(default=None, metadata={
        "help": "noise multiplier σ (experts; default: calibrated so that --rounds x "
        "--steps-per-round steps spend exactly --dp-epsilon)"})
    require_dp: float | None = field(default=None, metadata={
        "help": "merge only neighbours that announce DP training with ε at most this"})
    sample_rate: float | None = field(default=None, metadata={
        "help": "Poisson sampling rate q of each DP step (an expected q x N of the peer's N "
        "examples a step) instead of --batch-size / N: peers of a swarm that share q share σ "
        "for the same ε, and their merge weights follow their data (see README)"})
    accountant: str = field(default="prv", metadata={
        "help": "how ε is counted: prv (Opacus's PRV accountant wherever it is tighter than "
        "RDP: 6-7 percent less noise for the same ε here) or rdp (Opacus's RDP accountant "
        "alone)"})

    @property
    def enabled(self) -> bool:
        return self.epsilon is not None

    def __post_init__(self) -> None:
        if self.epsilon is not None and not (0 < self.epsilon < math.inf):
            raise ValueError(f"dp_epsilon must be a finite number > 0, got {self.epsilon}")
        if not 0 < self.delta < 1:
            raise ValueError(f"dp_delta must be in (0, 1), got {self.delta}")
        if not 0 < self.clip < math.inf:
            raise ValueError(f"dp_clip must be a finite number > 0, got {self.clip}")
        if self.noise is not None and not (0 < self.noise <= MAX_NOISE):
            raise ValueError(f"dp_noise must be in (0, {MAX_NOISE:g}], got {self.noise}")
        if self.noise is not None and self.epsilon is None:
            raise ValueError("dp_noise needs dp_epsilon (the budget at which training stops)")
        if self.sample_rate is not None and not (0 < self.sample_rate <= 1):
            raise ValueError(f"dp_sample_rate must be in (0, 1], got {self.sample_rate}")
        if self.sample_rate is not None and self.epsilon is None:
            raise ValueError("dp_sample_rate needs dp_epsilon (it sets DP-SGD's sampling)")
        if self.require_dp is not None and not (0 < self.require_dp < math.inf):
            raise ValueError(f"require_dp must be a finite ε > 0, got {self.require_dp}")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"dp_accountant must be one of {', '.join(ACCOUNTANTS)}, "
                             f"got {self.accountant!r}")

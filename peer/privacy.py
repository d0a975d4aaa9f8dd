"""Differential privacy of a peer's own training steps: its settings and its ε ledger.

With `--dp-epsilon`, every local step is a DP-SGD step (`peer.dpsgd`): a Poisson sample of the
peer's examples, each example's gradient clipped to `--dp-clip`, Gaussian noise of standard
deviation σ·C added to their sum. Opacus's RDP accountant turns (σ, sampling rate q, steps)
into ε at `--dp-delta`. Whatever the peer shares afterwards (its adapter, merged or not) is
post-processing of DP-trained values, so gossip rounds and merges cost no ε: the ledger counts
the peer's own steps only.

The ledger is a list of segments (σ, q, steps) that only ever grows; a step without noise (a
peer that trained before turning DP on) makes ε infinite for good. It is written to the data
folder before the adapter those steps produced is served (`PeerStore.save_ledger`), so a crash
cannot release steps that a restart then forgets.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

from peer.errors import ConfigError

# OPACUS_NOTE: opacus is imported inside the functions that use it, never at module level:
# importing it runs `logging.basicConfig` (opacus/utils/module_utils.py), which, before the CLI
# configured logging, put a handler of its own format on the root logger, so that
# `--log-format json` wrote lines that were not JSON (tests/test_logs.py).
# The RDP orders opacus's RDPAccountant uses by default.
ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))
# A budget that needs more noise than this per step trains nothing useful: refuse it.
MAX_NOISE = 100.0
# What `--require-dp` refusals are counted as (beside gossip's and merge's reasons).
PRIVACY_REASONS = frozenset({
    "not_private",  # the neighbour announces no DP guarantee
    "epsilon_over",  # it announces an ε above our --require-dp
})


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
        if self.require_dp is not None and not (0 < self.require_dp < math.inf):
            raise ValueError(f"require_dp must be a finite ε > 0, got {self.require_dp}")


@lru_cache(maxsize=64)
def _unit_rdp(noise: float, rate: float) -> np.ndarray:
    """RDP of one step at each order; T steps cost T times as much (composition)."""
    from opacus.accountants.analysis import rdp as rdp_analysis  # lazily: see OPACUS_NOTE

    return np.asarray(rdp_analysis.compute_rdp(q=rate, noise_multiplier=noise, steps=1,
                                               orders=list(ORDERS)), dtype=np.float64)


@contextmanager
def _largest_order_quiet() -> Iterator[None]:
    """Silence Opacus's "Optimal order is the largest alpha" inside the block.

    It says that ε is an upper bound looser than it could be (large σ, few steps): safe. The
    ledger would print it every step, and `calibrate` three times a start: its search tries
    large σ on the way. The σ it returns is not at the largest order (63): for ε 0.5 to 8 and
    rates 1e-4 to 0.16 the best order was 2.4 to 32.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha",
                                category=UserWarning)
        yield


def epsilon_of(history: Sequence[tuple[float, float, int]], delta: float) -> float:
    """ε spent at `delta` by the segments (σ, q, steps): Opacus's RDP accountant's answer."""
    steps = [(noise, rate, count) for noise, rate, count in history if count > 0]
    if not steps:
        return 0.0
    if any(noise <= 0 for noise, _, _ in steps):
        return math.inf  # a step without noise has no DP guarantee
    total = sum(_unit_rdp(noise, rate) * count for noise, rate, count in steps)
    with _largest_order_quiet():
        from opacus.accountants.analysis import rdp as rdp_analysis  # lazily: see OPACUS_NOTE

        eps, _ = rdp_analysis.get_privacy_spent(orders=list(ORDERS), rdp=total, delta=delta)
    return float(eps)


def calibrate(config: PrivacyConfig, *, rate: float, steps: int) -> float:
    """The noise multiplier σ with which `steps` steps at sampling rate `rate` spend ε.

    Raises:
        ConfigError: the budget needs more noise than `MAX_NOISE` (too small to train).
    """
    assert config.epsilon is not None
    # Opacus's search doubles σ until the budget holds, which took 32 s to give up on ε = 1e-4;
    # one accountant call at the most noise we accept tells the same at once.
    if epsilon_of([(MAX_NOISE, rate, steps)], config.delta) > config.epsilon:
        raise ConfigError(f"--dp-epsilon {config.epsilon:g} is too small for {steps} steps "
                          f"(even noise σ = {MAX_NOISE:g} spends more); raise it or "
                          "--dp-delta, or train fewer steps")
    try:
        from opacus.accountants.utils import get_noise_multiplier  # lazily: see OPACUS_NOTE

        with _largest_order_quiet():
            noise = float(get_noise_multiplier(target_epsilon=config.epsilon,
                                               target_delta=config.delta, sample_rate=rate,
                                               steps=steps, accountant="rdp"))
    except ValueError as exc:
        raise ConfigError(f"--dp-epsilon {config.epsilon:g} is too small for {steps} steps "
                          f"({exc}); raise it or --dp-delta, or train fewer steps") from exc
    if noise > MAX_NOISE:
        raise ConfigError(f"--dp-epsilon {config.epsilon:g} needs noise σ = {noise:.0f} for "
                          f"{steps} steps: too much to learn; raise it or train fewer steps")
    return noise


class Ledger:
    """The ε a peer has spent on its own steps: segments (σ, q, steps) that only grow.

    Args:
        config: the budget (`epsilon`) and δ; a config without DP records noiseless steps.
        noise: σ of this run's steps (0: not private).
        rate: Poisson sampling rate q of this run's steps (batch size / examples).
        history: the segments of earlier runs, from the data folder.
    """

    def __init__(self, config: PrivacyConfig, *, noise: float = 0.0, rate: float = 1.0,
                 history: Sequence[tuple[float, float, int]] = ()) -> None:
        self.config = config
        self.noise = noise
        self.rate = rate
        self.history = [(float(noise), float(q), int(steps)) for noise, q, steps in history]

    @property
    def private(self) -> bool:
        return self.config.enabled and self.noise > 0

    @property
    def steps(self) -> int:
        return sum(count for _, _, count in self.history)

    def epsilon(self) -> float:
        """ε spent so far at the configured δ (inf once a step was taken without noise)."""
        return epsilon_of(self.history, self.config.delta)

    def record(self, steps: int = 1) -> None:
        """Count `steps` more steps of this run's (σ, q)."""
        if self.history and self.history[-1][:2] == (self.noise, self.rate):
            noise, rate, count = self.history[-1]
            self.history[-1] = (noise, rate, count + steps)
        else:
            self.history.append((self.noise, self.rate, steps))

    def affords(self, steps: int = 1) -> bool:
        """Whether `steps` more steps stay within the budget (always, without a budget)."""
        if self.config.epsilon is None:
            return True
        after = [*self.history, (self.noise, self.rate, steps)]
        return epsilon_of(after, self.config.delta) <= self.config.epsilon

    def announced(self) -> float:
        """ε for an announcement: the finite ε spent, or -1.0 for "no DP guarantee"."""
        if not self.config.enabled:
            return -1.0
        eps = self.epsilon()
        return eps if math.isfinite(eps) else -1.0

    def record_dict(self) -> dict[str, Any]:
        """`privacy` of status.json and metrics lines (ε null: no guarantee, i.e. infinite)."""
        eps = self.epsilon()
        private = self.config.enabled
        return {"epsilon": round(eps, 6) if private and math.isfinite(eps) else None,
                "delta": self.config.delta if private else None, "steps": self.steps,
                "noise_multiplier": self.noise, "clip": self.config.clip if private else None}

    def to_json(self) -> dict[str, Any]:
        return {"history": [list(segment) for segment in self.history]}


def parse_history(data: Any) -> list[tuple[float, float, int]]:
    """The segments of a saved ledger, checked.

    Raises:
        ValueError: what is wrong with it, in a few words.
    """
    if not isinstance(data, dict) or not isinstance(data.get("history"), list):
        raise ValueError("not a ledger (no history list)")
    history = []
    for item in data["history"]:
        if not (isinstance(item, list) and len(item) == 3):
            raise ValueError("a ledger segment is not [noise, rate, steps]")
        noise, rate, count = item
        if not (isinstance(noise, int | float) and isinstance(rate, int | float)
                and type(count) is int):
            raise ValueError("a ledger segment has values of the wrong type")
        if not (0 <= noise < math.inf and 0 < rate <= 1 and count >= 0):
            raise ValueError("a ledger segment is out of range")
        history.append((float(noise), float(rate), count))
    return history


def check_data(config: PrivacyConfig, *, examples: int, batch_size: int, pack: bool) -> None:
    """Refuse DP settings that this peer's data makes meaningless.

    Raises:
        ConfigError: δ ≥ 1/N (a guarantee that allows leaking a whole example), packing
            (a row would hold several examples, so clipping would bound rows, not examples),
            or a batch larger than the data.
    """
    if not config.enabled:
        return
    if config.delta >= 1 / examples:
        raise ConfigError(f"--dp-delta {config.delta:g} must be below 1/N = {1 / examples:.3g} "
                          f"({examples} training examples); e.g. --dp-delta "
                          f"{_below(1 / examples):g}")
    if pack:
        raise ConfigError("--pack puts several examples in a row, but DP-SGD clips each "
                          "example's gradient; turn --pack off with --dp-epsilon")
    if batch_size > examples:
        raise ConfigError(f"--batch-size {batch_size} exceeds the {examples} training examples; "
                          "DP-SGD samples each example with probability batch/N")


def _below(bound: float) -> float:
    """A round δ under `bound`: 1e-k for the smallest k that fits."""
    return 10.0 ** math.floor(math.log10(bound) - 1e-9)


def plan(config: PrivacyConfig, *, examples: int, batch_size: int, steps: int,
         history: Sequence[tuple[float, float, int]] = ()) -> Ledger:
    """This run's ledger: σ given or calibrated for `steps` steps, q = batch / examples.

    Args:
        steps: how many steps the budget is spread over (--rounds x --steps-per-round); 0
            means "until stopped", which needs --dp-noise.

    Raises:
        ConfigError: no σ can be chosen, or the budget does not afford even one step.
    """
    if not config.enabled:
        return Ledger(config, history=history)
    if batch_size > examples:  # some examples had no token to predict within --seq-len
        raise ConfigError(f"--batch-size {batch_size} exceeds the {examples} usable training "
                          "examples; DP-SGD samples each with probability batch/N")
    rate = batch_size / examples
    noise = config.noise
    if noise is None:
        if steps < 1:
            raise ConfigError("--dp-epsilon without --rounds needs --dp-noise: the budget is "
                              "spread over --rounds x --steps-per-round steps")
        noise = calibrate(config, rate=rate, steps=steps)
    ledger = Ledger(config, noise=noise, rate=rate, history=history)
    if not ledger.history and not ledger.affords(1):
        raise ConfigError(f"--dp-epsilon {config.epsilon:g} is too small for even one step "
                          f"at --dp-noise {noise:g} (one step costs ε = "
                          f"{epsilon_of([(noise, rate, 1)], config.delta):.3g})")
    return ledger

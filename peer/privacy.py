"""Differential privacy of a peer's own training steps: its ε ledger and σ's calibration.

Its settings (`PrivacyConfig`) live in `peer.privacy_config`, which the command line loads
without torch or opacus.

With `--dp-epsilon`, every local step is a DP-SGD step (`peer.dpsgd`): a Poisson sample of the
peer's examples, each example's gradient clipped to `--dp-clip`, Gaussian noise of standard
deviation σ·C added to their sum. An accountant (`peer.accounting`: Opacus's PRV where it is
tighter than its RDP, or RDP alone) turns (σ, sampling rate q, steps) into ε at `--dp-delta`.
Whatever the peer shares afterwards (its adapter, merged or not) is post-processing of
DP-trained values, so gossip rounds and merges cost no ε: the ledger counts the peer's own
steps only.

The ledger is a list of segments (σ, q, steps) that only ever grows; a step without noise (a
peer that trained before turning DP on) makes ε infinite for good. It is written to the data
folder before the adapter those steps produced is served (`PeerStore.save_ledger`), so a crash
cannot release steps that a restart then forgets.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from gossip.wire import MAX_EPSILON, NOT_PRIVATE
from peer.accounting import (
    Segment,
    calibrate,
    epsilon_of,
    extended,
    most_steps,
)
from peer.errors import ConfigError
from peer.privacy_config import PrivacyConfig

# What `--require-dp` refusals are counted as (beside gossip's and merge's reasons).
PRIVACY_REASONS = frozenset({
    "not_private",  # the neighbour announces no DP guarantee
    "epsilon_over",  # it announces an ε above our --require-dp
})


class Ledger:
    """The ε a peer has spent on its own steps: segments (σ, q, steps) that only grow.

    Args:
        config: the budget (`epsilon`) and δ; a config without DP records noiseless steps.
        noise: σ of this run's steps (0: not private).
        rate: Poisson sampling rate q of this run's steps (--dp-sample-rate, or batch size /
            examples).
        history: the segments of earlier runs, from the data folder.
        planned: the steps σ was calibrated for, if it was (where the budget should end).
        examples: the peer's N, for the expected batch q·N that `describe` says (0: unknown).
    """

    def __init__(self, config: PrivacyConfig, *, noise: float = 0.0, rate: float = 1.0,
                 history: Sequence[Segment] = (), planned: int = 0, examples: int = 0) -> None:
        self.config = config
        self.noise = noise
        self.examples = examples
        self.rate = rate
        self.planned = planned
        self.history = [(float(noise), float(q), int(steps)) for noise, q, steps in history]
        self._most: int | None = None  # steps the budget holds; `record` keeps it valid

    @property
    def private(self) -> bool:
        return self.config.enabled and self.noise > 0

    @property
    def steps(self) -> int:
        return sum(count for _, _, count in self.history)

    def epsilon(self) -> float:
        """ε spent so far at the configured δ (inf once a step was taken without noise)."""
        return epsilon_of(self.history, self.config.delta, self.config.accountant)

    def record(self, steps: int = 1) -> None:
        """Count `steps` more steps of this run's (σ, q)."""
        self.history = extended(self.history, (self.noise, self.rate, steps))

    def affords(self, steps: int = 1) -> bool:
        """Whether `steps` more steps stay within the budget (always, without a budget)."""
        return self.config.epsilon is None or self.steps + steps <= self.most_steps()

    def most_steps(self) -> int:
        """The step count at which this run's (σ, q) will have spent the budget.

        Found once (a few accountant calls; `plan` asks, in the loading thread): every step
        after it is recorded at the same (σ, q), so the count stays what it was.
        """
        if self._most is None:
            assert self.config.epsilon is not None
            self._most = self.steps + most_steps(
                self.history, noise=self.noise, rate=self.rate, epsilon=self.config.epsilon,
                delta=self.config.delta, accountant=self.config.accountant,
                guess=self.planned - self.steps)
        return self._most

    def describe(self) -> str:
        """One line for the start-up log: the noise, the sampling and what the budget holds."""
        assert self.config.epsilon is not None
        batch = f" (an expected {self.rate * self.examples:.3g} examples a step)" \
            if self.examples else ""
        return (f"DP-SGD: noise σ = {self.noise:.4g}, sampling rate q = {self.rate:.4g}{batch}, "
                f"clip C = {self.config.clip:g}; ε {self.epsilon():.4g} of {self.config.epsilon:g} "
                f"spent at δ = {self.config.delta:g} ({self.config.accountant} accountant); "
                f"the budget holds {self.most_steps() - self.steps} more steps")

    def announced(self) -> float:
        """ε for an announcement and transfer headers: the ε spent, or -1.0 for "no DP
        guarantee" (also past the wire's `MAX_EPSILON`, which guarantees nothing anyway)."""
        if not self.config.enabled:
            return NOT_PRIVATE
        eps = self.epsilon()
        return eps if eps <= MAX_EPSILON else NOT_PRIVATE

    def record_dict(self) -> dict[str, Any]:
        """`privacy` of status.json and metrics lines (ε null: no guarantee, i.e. infinite;
        budget null: no --dp-epsilon)."""
        eps = self.epsilon()
        private = self.config.enabled
        return {"epsilon": round(eps, 6) if private and math.isfinite(eps) else None,
                "delta": self.config.delta if private else None, "steps": self.steps,
                "noise_multiplier": self.noise, "clip": self.config.clip if private else None,
                "budget": self.config.epsilon,
                "accountant": self.config.accountant if private else None}

    def to_json(self) -> dict[str, Any]:
        return {"history": [list(segment) for segment in self.history]}


def parse_history(data: Any) -> list[Segment]:
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
    _check_batch(config, batch_size=batch_size, examples=examples)


def _check_batch(config: PrivacyConfig, *, batch_size: int, examples: int,
                 which: str = "") -> None:
    """Refuse an expected batch above N, which q = batch / N cannot sample (none with
    --dp-sample-rate, whose rate bounds the sample)."""
    if config.sample_rate is None and batch_size > examples:
        raise ConfigError(f"--batch-size {batch_size} exceeds the {examples} {which}training "
                          "examples; DP-SGD samples each example with probability batch/N (or "
                          "give --dp-sample-rate)")


def _below(bound: float) -> float:
    """A round δ under `bound`: 1e-k for the smallest k that fits."""
    return 10.0 ** math.floor(math.log10(bound) - 1e-9)


def plan(config: PrivacyConfig, *, examples: int, batch_size: int, steps: int,
         history: Sequence[Segment] = ()) -> Ledger:
    """This run's ledger: σ given or calibrated for `steps` steps, q = `--dp-sample-rate`, or
    batch / examples without it.

    Args:
        steps: how many steps the budget is spread over (--rounds x --steps-per-round); 0
            means "until stopped", which needs --dp-noise.

    Raises:
        ConfigError: no σ can be chosen, or the budget does not afford even one step.
    """
    if not config.enabled:
        return Ledger(config, history=history)
    # Again on the usable examples: some had no token to predict within --seq-len.
    _check_batch(config, batch_size=batch_size, examples=examples, which="usable ")
    rate = config.sample_rate if config.sample_rate is not None else batch_size / examples
    noise, planned = config.noise, 0
    if noise is None:
        if steps < 1:
            raise ConfigError("--dp-epsilon without --rounds needs --dp-noise: the budget is "
                              "spread over --rounds x --steps-per-round steps")
        assert config.epsilon is not None
        noise = calibrate(epsilon=config.epsilon, delta=config.delta, rate=rate, steps=steps,
                          accountant=config.accountant)
        planned = steps
    ledger = Ledger(config, noise=noise, rate=rate, history=history, planned=planned,
                    examples=examples)
    # Both worked out here, in the loading thread, not at the first step or status line.
    affordable = ledger.most_steps() - ledger.steps
    ledger.epsilon()
    if not ledger.history and affordable < 1:
        one = epsilon_of([(noise, rate, 1)], config.delta, config.accountant)
        raise ConfigError(f"--dp-epsilon {config.epsilon:g} is too small for even one step "
                          f"at --dp-noise {noise:g} (one step costs ε = {one:.3g})")
    return ledger

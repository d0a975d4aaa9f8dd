"""ε of a peer's DP-SGD steps: Opacus's RDP accountant, and its PRV accountant where tighter.

A peer's steps are segments (σ, q, steps) of the Poisson-subsampled Gaussian mechanism. Both
accountants bound the ε that their composition spends at δ from above, so the smaller of the two
bounds is a bound too: `prv` (the default) reports min(PRV, RDP), `rdp` reports RDP alone.
PRV (Gopi et al. 2021: the privacy loss distribution, composed numerically by FFT) is the
tighter: for the built-in swarm's largest peer (q = 8/305, 80 steps) the σ that RDP calibrates
for ε 8, 0.598, spends ε 6.66 by PRV, and PRV calibrates 0.559 (7 % less noise; 6 % for the
smallest peer, whose q = 8/49 is amplified less).

PRV's grid grows with ε and with the step count (measured here: 0.1 s for 80 steps at ε 7,
1.2 s for 100,000 steps at ε 8, 5 s at ε 26, 164 s for 200,000 steps at ε 115), so it is asked
only where RDP says ε ≤ `PRV_MAX_EPSILON` over at most `PRV_MAX_STEPS` steps; beyond, RDP's
answer stands (a bound all the same, and the budget is long spent there). Answers are cached
by the segments: a round's status line, announcement and metrics line ask once between them.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache

import numpy as np

from peer.errors import ConfigError

logger = logging.getLogger(__name__)

# OPACUS_NOTE: opacus is imported inside the functions that use it, never at module level:
# importing it runs `logging.basicConfig` (opacus/utils/module_utils.py), which, before the CLI
# configured logging, put a handler of its own format on the root logger, so that
# `--log-format json` wrote lines that were not JSON (tests/test_logs.py).

Segment = tuple[float, float, int]  # (noise multiplier σ, sampling rate q, steps)

ACCOUNTANTS = ("prv", "rdp")
# The RDP orders opacus's RDPAccountant uses by default.
ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))
# A budget that needs more noise than this per step trains nothing useful: refuse it.
MAX_NOISE = 100.0
# PRV's answer is its estimate plus at most this (Opacus's default): its upper bound.
PRV_EPS_ERROR = 0.01
# Where PRV is asked at all (see the module docstring).
PRV_MAX_EPSILON = 32.0
PRV_MAX_STEPS = 200_000
# Calibration finds σ to this relative precision (ε then lands within about 0.01 of the budget).
_SIGMA_PRECISION = 1e-3


def epsilon_of(history: Sequence[Segment], delta: float, accountant: str = "prv") -> float:
    """ε spent at `delta` by the segments (σ, q, steps), by `accountant` ("prv" or "rdp")."""
    steps = tuple((float(noise), float(rate), int(count))
                  for noise, rate, count in history if count > 0)
    if not steps:
        return 0.0
    if any(noise <= 0 for noise, _, _ in steps):
        return math.inf  # a step without noise has no DP guarantee
    return _epsilon(steps, float(delta), accountant)


@lru_cache(maxsize=512)
def _epsilon(steps: tuple[Segment, ...], delta: float, accountant: str) -> float:
    rdp = _rdp_epsilon(steps, delta)
    if (accountant == "rdp" or rdp > PRV_MAX_EPSILON
            or sum(count for _, _, count in steps) > PRV_MAX_STEPS):
        return rdp
    return min(rdp, _prv_epsilon(steps, delta))


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


def _rdp_epsilon(steps: tuple[Segment, ...], delta: float) -> float:
    """Opacus's RDP accountant's answer."""
    from opacus.accountants.analysis import rdp as rdp_analysis  # lazily: see OPACUS_NOTE

    total = sum(_unit_rdp(noise, rate) * count for noise, rate, count in steps)
    with _largest_order_quiet():
        eps, _ = rdp_analysis.get_privacy_spent(orders=list(ORDERS), rdp=total, delta=delta)
    return float(eps)


def _prv_epsilon(steps: tuple[Segment, ...], delta: float) -> float:
    """Opacus's PRV accountant's upper bound; inf where it cannot answer (RDP's then stands)."""
    from opacus.accountants import PRVAccountant  # lazily: see OPACUS_NOTE

    accountant = PRVAccountant()
    accountant.history = list(steps)
    try:  # its domain bound asks RDP (same warning as ours); extreme σ divide by zero in log
        with _largest_order_quiet(), np.errstate(all="ignore"):
            eps = float(accountant.get_epsilon(delta=delta, eps_error=PRV_EPS_ERROR))
    except (ValueError, ArithmeticError, RuntimeError, MemoryError) as exc:
        logger.debug("PRV accountant gave no answer for %s: %s", steps, exc)
        return math.inf
    return eps if math.isfinite(eps) and eps >= 0 else math.inf


def extended(history: Sequence[Segment], segment: Segment) -> list[Segment]:
    """`history` with `segment`'s steps added: to its last segment when (σ, q) are the same."""
    noise, rate, count = segment
    if history and tuple(history[-1][:2]) == (noise, rate):
        return [*history[:-1], (noise, rate, history[-1][2] + count)]
    return [*history, (noise, rate, count)]


def most_steps(history: Sequence[Segment], *, noise: float, rate: float, epsilon: float,
               delta: float, accountant: str = "prv", guess: int = 0) -> int:
    """The most steps at (σ, q) that `history` can still take without spending over `epsilon`.

    RDP's count is found first (cheap); PRV, never looser, is then searched upward from it,
    trying `guess` first (the steps σ was calibrated for: then two PRV calls settle it).
    """
    def fits(count: int, by: str) -> bool:
        after = extended(history, (noise, rate, count))
        return epsilon_of(after, delta, by) <= epsilon

    found = _largest(lambda count: fits(count, "rdp"), low=0)
    if accountant == "rdp":
        return found
    return _largest(lambda count: fits(count, accountant), low=found, guess=guess)


def _largest(fits: Callable[[int], bool], *, low: int, guess: int = 0,
             ceiling: int = 2**40) -> int:
    """The largest count that fits, given that `fits` is monotone and holds at `low` (or that
    `low` is 0): `guess` if it fits, then galloping up, then bisection. Past `ceiling` steps
    the budget is unbounded in practice, and the count found so far is returned."""
    if not fits(low):  # at 0: over budget already; else (not expected) search from 0
        return 0 if low == 0 else _largest(fits, low=0, ceiling=ceiling)
    if guess > low and fits(guess):
        low = guess
    stride = max(1, low // 1024)  # σ is calibrated to 0.1 %: a long run's budget ends nearby
    while fits(low + stride):
        low += stride
        stride *= 2
        if low > ceiling:
            return low
    high = low + stride
    while high - low > 1:
        middle = (low + high) // 2
        if fits(middle):
            low = middle
        else:
            high = middle
    return low


def calibrate(*, epsilon: float, delta: float, rate: float, steps: int,
              accountant: str = "prv") -> float:
    """The noise multiplier σ with which `steps` steps at sampling rate `rate` spend ε.

    Raises:
        ConfigError: the budget needs more noise than `MAX_NOISE` (too small to train).
    """
    # Opacus's search doubles σ until the budget holds, which took 32 s to give up on ε = 1e-4;
    # one accountant call at the most noise we accept tells the same at once.
    if epsilon_of([(MAX_NOISE, rate, steps)], delta, accountant) > epsilon:
        raise ConfigError(f"--dp-epsilon {epsilon:g} is too small for {steps} steps "
                          f"(even noise σ = {MAX_NOISE:g} spends more); raise it or "
                          "--dp-delta, or train fewer steps")
    try:
        from opacus.accountants.utils import get_noise_multiplier  # lazily: see OPACUS_NOTE

        with _largest_order_quiet():
            noise = float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta,
                                               sample_rate=rate, steps=steps,
                                               accountant="rdp"))
    except ValueError as exc:
        raise ConfigError(f"--dp-epsilon {epsilon:g} is too small for {steps} steps "
                          f"({exc}); raise it or --dp-delta, or train fewer steps") from exc
    if noise > MAX_NOISE:
        raise ConfigError(f"--dp-epsilon {epsilon:g} needs noise σ = {noise:.0f} for "
                          f"{steps} steps: too much to learn; raise it or train fewer steps")
    if accountant == "rdp":
        return noise
    return _least_noise(lambda sigma: epsilon_of([(sigma, rate, steps)], delta,
                                                 accountant) <= epsilon, fits_at=noise)


def _least_noise(fits: Callable[[float], bool], *, fits_at: float) -> float:
    """The least σ (to `_SIGMA_PRECISION`) at which `fits`, searching below `fits_at` (which
    does): down to a σ that does not fit (PRV's was 0.93-0.95 of RDP's for the built-in
    swarm's peers), then bisection."""
    high, low = fits_at, 0.85 * fits_at
    for _ in range(16):  # 0.85^16: under a tenth of RDP's σ; the search is bounded
        if not fits(low):
            break
        high, low = low, 0.85 * low
    else:
        return high
    while high - low > _SIGMA_PRECISION * high:
        middle = (low + high) / 2
        if fits(middle):
            high = middle
        else:
            low = middle
    return high

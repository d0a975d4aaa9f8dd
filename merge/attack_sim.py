"""The attack the norm bound must contain, as a pure simulation: a liar at its edge every round.

`scripts/` report `norm_growth_under_liar()` as `norm_growth`; the tests pin what it shows.
"""

from __future__ import annotations

import math

import torch

from merge.config import MergeConfig
from merge.errors import RejectedUpdate
from merge.reference import NormReference
from merge.rules import merge_states
from merge.tensors import floored_norm, state_norm
from merge.types import AdapterState, Contribution
from merge.validate import validate_update

_SHAPES = {"m.q.lora_A.weight": (4, 16), "m.q.lora_B.weight": (16, 4), "m.bias": (16,)}
_SAMPLES = 100  # the victim's and the honest neighbour's; the liar claims far more
_SPREAD = 0.05  # how far (relative to norm 1) honest adapters sit from each other
_BACKOFF = 0.95  # the liar shrinks its scaling by this until the victim accepts it


def norm_growth_under_liar(rounds: int = 5, ratio: float = 19.9, *, robust: bool = True,
                           max_norm_ratio: float = 20.0, seed: int = 0,
                           adaptive: bool = True) -> float:
    """How many times larger a victim's norm ends up with a liar among its neighbours.

    Setup: the victim (norm 1) merges by `average` every round with one honest neighbour (norm
    about 1, `_SPREAD` away, which stays put) and, in the attacked run, one liar. The liar
    serves its own honest-looking adapter scaled to `ratio` x the scale the victim bounds by
    (shrunk until `validate_update` accepts it, so always just inside the bound) and claims
    more samples than the cap, which gives it weight 2/3. With `adaptive` False it serves
    `ratio` x the victim's own norm every round instead, as the review's liar did, and is
    simply dropped when that is over the bound. With `robust` the victim bounds by
    a `NormReference` of the norms it accepted; without, by its own norm (the rule before
    `NormReference`), which compounds: x13.6 per round.

    Args:
        rounds: merges simulated.
        ratio: the liar's scaling relative to the victim's scale (just under `max_norm_ratio`).
        robust: bound by a `NormReference` rather than by the victim's own norm.
        max_norm_ratio: the victim's `MergeConfig.max_norm_ratio`.
        seed: of the adapters drawn.

    Returns:
        The victim's norm after `rounds` attacked rounds over its norm after as many clean ones.
    """
    config = MergeConfig(rule="average", max_norm_ratio=max_norm_ratio)
    victim, honest, liar = _adapters(seed)
    attacked = _run(rounds, victim, honest, liar, ratio, config, robust=robust,
                    adaptive=adaptive)
    clean = _run(rounds, victim, honest, None, ratio, config, robust=robust, adaptive=adaptive)
    return state_norm(attacked) / state_norm(clean)


def _adapters(seed: int) -> tuple[AdapterState, AdapterState, AdapterState]:
    gen = torch.Generator().manual_seed(seed)
    center = {key: torch.randn(shape, generator=gen) for key, shape in _SHAPES.items()}
    center = _scaled(center, 1.0 / state_norm(center))
    noisy = []
    for _ in range(3):
        noise = {key: torch.randn(t.shape, generator=gen) for key, t in center.items()}
        step = _scaled(noise, _SPREAD / state_norm(noise))
        noisy.append({key: center[key] + step[key] for key in center})
    return noisy[0], noisy[1], noisy[2]


def _run(rounds: int, victim: AdapterState, honest: AdapterState, liar: AdapterState | None,
         ratio: float, config: MergeConfig, *, robust: bool, adaptive: bool) -> AdapterState:
    own = victim
    reference = NormReference()
    for _ in range(rounds):
        scale = reference.scale(own) if robust else None
        norms: list[float] = []
        others: list[Contribution] = []
        try:
            norms.append(validate_update(own, honest, config, reference=scale))
            others.append(Contribution(honest, samples=_SAMPLES, peer="honest"))
        except RejectedUpdate:
            pass  # a victim carried far enough away refuses its honest neighbour too
        if liar is not None and not adaptive:
            served: AdapterState | None = _scaled(liar, ratio * state_norm(own) / state_norm(liar))
            try:
                validate_update(own, served or {}, config, reference=scale)
            except RejectedUpdate:
                served = None
            if served is not None:
                norms.append(state_norm(served))
                others.append(Contribution(served, samples=10**9, peer="liar"))
        elif liar is not None:
            bound_scale = floored_norm(own) if scale is None else scale
            served = _edge_of_bound(own, liar, ratio * bound_scale, config, scale)
            if served is not None:
                norms.append(state_norm(served))
                others.append(Contribution(served, samples=10**9, peer="liar"))
        own = merge_states(Contribution(own, samples=_SAMPLES), others, config)
        reference.update(norms)
    return own


def _edge_of_bound(own: AdapterState, liar: AdapterState, target: float, config: MergeConfig,
                   scale: float | None) -> AdapterState | None:
    """The liar's adapter scaled to norm `target`, or less until the victim accepts it."""
    factor = target / state_norm(liar)
    for _ in range(math.ceil(math.log(1e-3) / math.log(_BACKOFF))):
        served = _scaled(liar, factor)
        try:
            validate_update(own, served, config, reference=scale)
        except RejectedUpdate:
            factor *= _BACKOFF
            continue
        return served
    return None


def _scaled(state: AdapterState, factor: float) -> AdapterState:
    return {key: factor * t for key, t in state.items()}

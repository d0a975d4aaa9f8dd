"""peer.sketch: count sketches of adapters keep distances, deterministically and cheaply."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from peer import sketch as sketches
from peer.sketch import adapter_norm, sketch

# A LoRA-shaped state of 20,480 parameters.
SHAPES = {"q.lora_A": (4, 512), "q.lora_B": (512, 4), "v.lora_A": (4, 512),
          "v.lora_B": (64, 160)}


def random_state(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: scale * torch.randn(*shape, generator=generator)
            for name, shape in SHAPES.items()}


def distance(a: list[float] | dict[str, torch.Tensor],
             b: list[float] | dict[str, torch.Tensor]) -> float:
    if isinstance(a, dict) and isinstance(b, dict):
        return adapter_norm({k: a[k] - b[k] for k in a})
    assert isinstance(a, list) and isinstance(b, list)
    return math.dist(a, b)


def test_sketch_is_deterministic_and_ignores_key_order() -> None:
    state = random_state(0)
    reordered = {name: state[name].clone() for name in reversed(list(state))}
    first = sketch(state)
    assert len(first) == 64 and all(isinstance(x, float) for x in first)
    assert sketch(state) == first == sketch(reordered)
    assert sketch(state, seed=1) != first
    assert len(sketch(state, dim=8)) == 8


def test_distances_between_sketches_approximate_distances_between_adapters() -> None:
    # Peers near a common start: a shared base plus small, different drifts.
    base = random_state(100)
    peers = [{k: base[k] + d for k, d in random_state(seed, scale=0.05).items()}
             for seed in range(12)]
    sketches = [sketch(p) for p in peers]
    ratios = [distance(sketches[i], sketches[j]) / distance(peers[i], peers[j])
              for i in range(len(peers)) for j in range(i)]
    # ratio² ~ χ²(64)/64: the ratio has a standard deviation of about 0.09.
    assert all(0.6 < r < 1.4 for r in ratios), ratios
    assert abs(sum(ratios) / len(ratios) - 1) < 0.1
    # A difference confined to one tensor is kept as well as a spread-out one.
    moved = {k: v.clone() for k, v in base.items()}
    moved["v.lora_B"][3, 7] += 1.0
    assert 0.6 < distance(sketch(moved), sketch(base)) < 1.4


def test_sketch_norm_approximates_adapter_norm() -> None:
    for seed in range(5):
        state = random_state(seed)
        assert adapter_norm(state) == pytest.approx(
            float(torch.cat([t.flatten() for t in state.values()]).norm()), rel=1e-6)
        assert math.hypot(*sketch(state)) / adapter_norm(state) == pytest.approx(1, abs=0.4)


def test_identical_states_and_empty_states() -> None:
    state = random_state(3)
    copy = {k: v.clone() for k, v in state.items()}
    assert sketch(state) == sketch(copy)
    assert sketch({}) == [0.0] * 64 and adapter_norm({}) == 0.0
    assert sketch({k: torch.zeros_like(v) for k, v in state.items()}) == [0.0] * 64


def test_low_precision_tensors_are_sketched_as_their_float32_values() -> None:
    state = random_state(4)
    half = {k: v.to(torch.bfloat16) for k, v in state.items()}
    widened = {k: v.to(torch.float32) for k, v in half.items()}
    assert sketch(half) == sketch(widened)


def test_one_coordinate_moves_one_entry_by_its_change() -> None:
    # A count sketch adds each coordinate, with a fixed sign, to one fixed entry.
    base = random_state(5)
    moved = {k: v.clone() for k, v in base.items()}
    moved["q.lora_B"][100, 2] += 0.5
    change = [a - b for a, b in zip(sketch(moved), sketch(base), strict=True)]
    assert sorted(abs(c) for c in change)[-1] == pytest.approx(0.5, rel=1e-9)
    assert sum(abs(c) > 1e-9 for c in change) == 1


def test_buckets_are_drawn_once_per_tensor_not_per_sketch() -> None:
    # Drawing random numbers for every metrics line made a GPU peer's rounds 13 times longer.
    state = random_state(6)
    sketch(state, seed=12345)
    drawn = sketches._buckets.cache_info().misses
    for scale in (1.0, 2.0, -3.0):
        sketch({k: scale * v for k, v in state.items()}, seed=12345)
    assert sketches._buckets.cache_info().misses == drawn


def test_dimension_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        sketch(random_state(0), dim=0)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 40), seed=st.integers(0, 2**31),
       factor=st.floats(-10, 10, allow_nan=False), sketch_seed=st.integers(0, 2**31))
def test_sketch_is_linear(rows: int, cols: int, seed: int, factor: float,
                          sketch_seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    a = {"x": torch.randn(rows, cols, generator=generator),
         "y": torch.randn(cols, generator=generator)}
    b = {k: torch.randn(v.shape, generator=generator) for k, v in a.items()}
    combined = sketch({k: a[k] + factor * b[k] for k in a}, seed=sketch_seed)
    expected = [p + factor * q for p, q in zip(sketch(a, seed=sketch_seed),
                                               sketch(b, seed=sketch_seed), strict=True)]
    assert combined == pytest.approx(expected, rel=1e-4, abs=1e-3 * (1 + abs(factor)))
    # Each tensor has its own directions: sketching a state is summing its tensors' sketches.
    parts = [sketch({k: v}, seed=sketch_seed) for k, v in a.items()]
    assert sketch(a, seed=sketch_seed) == pytest.approx(
        [p + q for p, q in zip(*parts, strict=True)], rel=1e-5, abs=1e-5)

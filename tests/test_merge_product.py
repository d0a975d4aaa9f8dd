"""`product`: the best rank-r factors of the weighted sum of B A, checked against a dense SVD."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from merge.config import MergeConfig
from merge.errors import RejectedUpdate
from merge.product import merge_pair, rescale_lora
from merge.registry import RULES, Rule
from merge.rules import merge_states
from merge.types import Contribution
from merge.validate import MAX_RANK_FACTOR, validate_update
from merge.weights import merge_weights

PRODUCT = MergeConfig(rule="product")
AVERAGE = MergeConfig(rule="average")
A_KEY, B_KEY = "layer.q.lora_A.weight", "layer.q.lora_B.weight"


def pair_state(gen: torch.Generator, d_out: int, d_in: int, rank: int) -> dict[str, torch.Tensor]:
    return {
        A_KEY: torch.randn(rank, d_in, generator=gen),
        B_KEY: torch.randn(d_out, rank, generator=gen),
        "layer.bias": torch.randn(d_out, generator=gen),
    }


def delta(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return state[B_KEY].double() @ state[A_KEY].double()


def weighted_delta(contributions: list[Contribution], config: MergeConfig) -> torch.Tensor:
    weights = merge_weights(contributions[0], contributions[1:], config)
    return sum((w * delta(dict(c.state)) for c, w in zip(contributions, weights, strict=True)),
               torch.zeros(()))


def contributions_from(seed: int, d_out: int, d_in: int, ranks: list[int]) -> list[Contribution]:
    gen = torch.Generator().manual_seed(seed)
    return [
        Contribution(pair_state(gen, d_out, d_in, rank), samples=10 + 7 * i, age=i % 3,
                     peer=f"p{i}" if i else "")
        for i, rank in enumerate(ranks)
    ]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), d_out=st.integers(1, 10), d_in=st.integers(1, 10),
       ranks=st.lists(st.integers(1, 4), min_size=1, max_size=4))
def test_product_is_the_best_rank_r_approximation(seed: int, d_out: int, d_in: int,
                                                  ranks: list[int]) -> None:
    contributions = contributions_from(seed, d_out, d_in, ranks)
    merged = merge_states(contributions[0], contributions[1:], PRODUCT)
    target = weighted_delta(contributions, PRODUCT)
    rank = ranks[0]
    assert merged[A_KEY].shape == (rank, d_in) and merged[B_KEY].shape == (d_out, rank)
    singular = torch.linalg.svdvals(target)
    optimal = float(singular[rank:].square().sum().sqrt())
    error = float(torch.linalg.matrix_norm(target - delta(merged)))
    scale = float(torch.linalg.matrix_norm(target))
    # Eckart-Young: no rank-r matrix is closer, so matching the optimum means it is a best one.
    assert error <= optimal + 1e-4 * scale + 1e-6
    if rank < len(singular) and singular[rank - 1] - singular[rank] > 1e-2 * scale:
        # With a spectral gap the best rank-r approximation is unique: compare it directly.
        u, s, vh = torch.linalg.svd(target)
        reference = u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]
        torch.testing.assert_close(delta(merged), reference, atol=1e-4 * scale, rtol=0)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), spread=st.floats(0.01, 3.0), k=st.integers(1, 4))
def test_product_is_never_worse_than_averaging_the_factors(seed: int, spread: float,
                                                           k: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    shared = pair_state(gen, 8, 6, 2)
    contributions = [
        Contribution({key: t + spread * torch.randn(t.shape, generator=gen)
                      for key, t in shared.items()}, samples=5 + i, peer=str(i))
        for i in range(k + 1)
    ]
    target = weighted_delta(contributions, PRODUCT)
    own, others = contributions[0], contributions[1:]
    product_error = torch.linalg.matrix_norm(target - delta(merge_states(own, others, PRODUCT)))
    average_error = torch.linalg.matrix_norm(target - delta(merge_states(own, others, AVERAGE)))
    # The averaged factors give a rank-r matrix too, so the optimum cannot be worse.
    assert product_error <= average_error * (1 + 1e-5) + 1e-6


def test_product_factors_are_balanced_and_bias_is_averaged() -> None:
    contributions = contributions_from(1, 9, 7, [3, 3, 3])
    merged = merge_states(contributions[0], contributions[1:], PRODUCT)
    b, a = merged[B_KEY].double(), merged[A_KEY].double()
    torch.testing.assert_close(b.T @ b, a @ a.T, atol=1e-4, rtol=1e-4)
    weights = merge_weights(contributions[0], contributions[1:], PRODUCT)
    bias = sum(w * c.state["layer.bias"] for c, w in zip(contributions, weights, strict=True))
    torch.testing.assert_close(merged["layer.bias"], bias)


def test_identical_balanced_adapters_come_back_unchanged() -> None:
    gen = torch.Generator().manual_seed(2)
    u, s, vh = torch.linalg.svd(torch.randn(8, 3, generator=gen) @ torch.randn(3, 5, generator=gen))
    root = s[:3].sqrt()
    state = {B_KEY: u[:, :3] * root, A_KEY: root[:, None] * vh[:3], "layer.bias": torch.ones(8)}
    own = Contribution(state, samples=3)
    others = [Contribution(dict(state), samples=n, age=age, peer=f"p{n}")
              for n, age in [(9, 1), (4, 0)]]
    merged = merge_states(own, others, PRODUCT)
    for key, value in state.items():
        torch.testing.assert_close(merged[key], value, atol=1e-5, rtol=1e-5)


def test_unbalanced_identical_adapters_keep_their_delta() -> None:
    own = contributions_from(3, 6, 6, [2])[0]
    merged = merge_states(own, [Contribution(own.state, samples=10, peer="x")], PRODUCT)
    torch.testing.assert_close(delta(merged), delta(dict(own.state)), atol=1e-5, rtol=1e-5)


def test_all_zero_b_keeps_our_a_so_the_adapter_stays_trainable() -> None:
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(4, 6, generator=gen)
    fresh = {A_KEY: a, B_KEY: torch.zeros(5, 4), "layer.bias": torch.zeros(5)}
    other = {A_KEY: torch.randn(4, 6, generator=gen), B_KEY: torch.zeros(5, 4),
             "layer.bias": torch.zeros(5)}
    merged = merge_states(Contribution(fresh, 1), [Contribution(other, 1, peer="x")], PRODUCT)
    torch.testing.assert_close(merged[B_KEY], torch.zeros(5, 4))
    torch.testing.assert_close(merged[A_KEY], a)


def test_rank_deficient_sum_leaves_no_dead_direction() -> None:
    # Both deltas are rank 1 along the same directions: the merged delta has rank 1 < r = 3.
    gen = torch.Generator().manual_seed(5)
    col, row = torch.randn(7, 1, generator=gen), torch.randn(1, 6, generator=gen)
    states = [
        {A_KEY: torch.cat([row * c, torch.randn(2, 6, generator=gen)]),
         B_KEY: torch.cat([col, torch.zeros(7, 2)], dim=1)}
        for c in (1.0, 2.0)
    ]
    own, other = Contribution(states[0], 1), Contribution(states[1], 1, peer="x")
    merged = merge_states(own, [other], PRODUCT)
    torch.testing.assert_close(delta(merged), weighted_delta([own, other], PRODUCT),
                               atol=1e-5, rtol=1e-5)
    # Every rank direction still has a non-zero A row, so B's gradient there is non-zero.
    assert torch.linalg.matrix_rank(merged[A_KEY].double()) == 3


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), own_rank=st.integers(1, 5),
       other_ranks=st.lists(st.integers(1, 8), min_size=1, max_size=3))
def test_heterogeneous_ranks_merge_through_product(seed: int, own_rank: int,
                                                  other_ranks: list[int]) -> None:
    # Ranks above MAX_RANK_FACTOR x ours are refused (their own test is in test_merge_validate).
    ranks = [min(rank, MAX_RANK_FACTOR * own_rank) for rank in other_ranks]
    contributions = contributions_from(seed, 12, 10, [own_rank, *ranks])
    own, others = contributions[0], contributions[1:]
    for other in others:
        validate_update(own.state, other.state, PRODUCT, allow_rank_change=True)
    merged = merge_states(own, others, PRODUCT)
    assert merged[A_KEY].shape == (own_rank, 10) and merged[B_KEY].shape == (12, own_rank)
    target = weighted_delta(contributions, PRODUCT)
    optimal = torch.linalg.svdvals(target)[own_rank:].square().sum().sqrt()
    error = torch.linalg.matrix_norm(target - delta(merged))
    assert error <= optimal + 1e-4 * torch.linalg.matrix_norm(target) + 1e-6


@pytest.mark.parametrize("rule", [entry for entry in RULES.values() if not entry.rank_free],
                         ids=lambda entry: entry.name)
def test_other_rules_refuse_another_rank(rule: Rule) -> None:
    own, other = contributions_from(6, 5, 5, [2, 3])
    with pytest.raises(RejectedUpdate) as info:
        validate_update(own.state, other.state, MergeConfig(rule=rule.name),
                        allow_rank_change=rule.rank_free)
    assert info.value.reason == "rank_mismatch"


def test_conv_shaped_pairs_merge_as_flattened_matrices() -> None:
    gen = torch.Generator().manual_seed(7)
    terms = [(torch.randn(6, 2, 1, 1, generator=gen), torch.randn(2, 3, 3, 3, generator=gen), w)
             for w in (0.25, 0.75)]
    own_b, own_a = terms[0][0], terms[0][1]
    pair = merge_pair(terms, own_b, own_a)
    assert pair.b.shape == own_b.shape and pair.a.shape == own_a.shape
    target = sum(w * b.reshape(6, 2).double() @ a.reshape(2, -1).double() for b, a, w in terms)
    optimal = torch.linalg.svdvals(target)[2:].square().sum()
    got = pair.b.reshape(6, 2) @ pair.a.reshape(2, -1)
    assert abs(float(torch.linalg.matrix_norm(target - got)) ** 2 - float(optimal)) < 1e-4
    assert abs(pair.residual_sq - float(optimal)) < 1e-4


def test_rescale_lora_scales_only_the_delta() -> None:
    state = contributions_from(8, 4, 4, [2])[0].state
    scaled = rescale_lora(state, 0.5)
    torch.testing.assert_close(delta(scaled), 0.5 * delta(dict(state)))
    torch.testing.assert_close(scaled[A_KEY], state[A_KEY])
    assert scaled[A_KEY].data_ptr() != state[A_KEY].data_ptr()

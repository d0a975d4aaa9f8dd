"""`merge.lowrank` and the batched `product`: Gram-based factors against a dense reference ΔW."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from merge.config import MergeConfig
from merge.errors import MergeError
from merge.lowrank import _loaded_cholesky, balanced_factors, project
from merge.product import merge_pair, merge_pairs
from merge.rules import merge_states
from merge.types import Contribution
from merge.weights import merge_weights

PRODUCT = MergeConfig(rule="product")
MODULES = ("q", "k", "v", "o")


def adapter(gen: torch.Generator, outs: dict[str, int], d_in: int, rank: int,
            dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """One LoRA pair per module, `outs` giving each module's d_out."""
    state = {}
    for module, d_out in outs.items():
        state[f"{module}.lora_A.weight"] = torch.randn(rank, d_in, generator=gen, dtype=dtype)
        state[f"{module}.lora_B.weight"] = torch.randn(d_out, rank, generator=gen, dtype=dtype)
    return state


def dense_delta(state: dict[str, torch.Tensor], module: str) -> torch.Tensor:
    return state[f"{module}.lora_B.weight"].double() @ state[f"{module}.lora_A.weight"].double()


def target_delta(contributions: list[Contribution], module: str) -> torch.Tensor:
    """The exact merged ΔW = Σ wᵢ Bᵢ Aᵢ, formed densely."""
    weights = merge_weights(contributions[0], contributions[1:], PRODUCT)
    return sum((w * dense_delta(dict(c.state), module)
                for c, w in zip(contributions, weights, strict=True)), torch.zeros(()))


def swarm(seed: int, outs: dict[str, int], d_in: int,
          ranks: list[int], dtype: torch.dtype = torch.float32) -> list[Contribution]:
    gen = torch.Generator().manual_seed(seed)
    return [Contribution(adapter(gen, outs, d_in, rank, dtype), samples=5 + 3 * i, age=i % 2,
                         peer=f"p{i}" if i else "")
            for i, rank in enumerate(ranks)]


def best_rank_r(target: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(target)
    return u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]


@pytest.mark.parametrize("d_out", [5, 40], ids=["d_out<=K", "d_out>K"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_merged_delta_is_the_dense_best_rank_r(d_out: int, dtype: torch.dtype) -> None:
    # K = 4 x 3 = 12: d_out 5 takes the direct d_out x d_out eigenproblem, 40 the Cholesky one.
    contributions = swarm(1, {"q": d_out, "k": d_out}, 30, [3, 3, 3, 3], dtype)
    merged = merge_states(contributions[0], contributions[1:], PRODUCT)
    for module in ("q", "k"):
        target = target_delta(contributions, module)
        singular = torch.linalg.svdvals(target)
        assert singular[2] - singular[3] > 1e-2 * singular[0]  # a gap: the optimum is unique
        reference = best_rank_r(target, 3)
        tolerance = 1e-10 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(dense_delta(merged, module), reference,
                                   atol=tolerance * float(singular[0]), rtol=0)
        assert merged[f"{module}.lora_A.weight"].dtype == dtype


def test_batched_pairs_equal_one_pair_at_a_time() -> None:
    contributions = swarm(2, dict.fromkeys(MODULES, 24), 20, [4, 4, 4])
    weights = merge_weights(contributions[0], contributions[1:], PRODUCT)
    own = contributions[0].state
    terms = [[(c.state[f"{m}.lora_B.weight"], c.state[f"{m}.lora_A.weight"], w)
              for c, w in zip(contributions, weights, strict=True)] for m in MODULES]
    batched = merge_pairs(terms, [own[f"{m}.lora_B.weight"] for m in MODULES],
                          [own[f"{m}.lora_A.weight"] for m in MODULES])
    for module, pair, together in zip(MODULES, terms, batched, strict=True):
        alone = merge_pair(pair, own[f"{module}.lora_B.weight"], own[f"{module}.lora_A.weight"])
        torch.testing.assert_close(together.b, alone.b, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(together.a, alone.a, atol=1e-6, rtol=1e-6)
        assert together.residual_sq == pytest.approx(alone.residual_sq, rel=1e-6, abs=1e-9)


def test_modules_of_different_shapes_and_ranks_merge_in_their_own_batches() -> None:
    # q/o are 24 x 20, k/v 6 x 20; the neighbours have ranks 2, 5 and 8 against our 4.
    outs = {"q": 24, "k": 6, "v": 6, "o": 24}
    contributions = swarm(3, outs, 20, [4, 2, 5, 8])
    merged = merge_states(contributions[0], contributions[1:], PRODUCT)
    for module, d_out in outs.items():
        assert merged[f"{module}.lora_B.weight"].shape == (d_out, 4)
        assert merged[f"{module}.lora_A.weight"].shape == (4, 20)
        target = target_delta(contributions, module)
        optimal = torch.linalg.svdvals(target)[4:].square().sum().sqrt()
        error = torch.linalg.matrix_norm(target - dense_delta(merged, module))
        assert error <= optimal + 1e-5 * torch.linalg.matrix_norm(target)


@pytest.mark.parametrize("d_out", [8, 60], ids=["d_out<=K", "d_out>K"])
def test_identical_neighbours_give_back_the_exact_delta_and_a_full_rank_a(d_out: int) -> None:
    # K = 7 x 4 = 28 stacked directions, but every Gram has rank 4: the stacks are singular.
    own = swarm(4, {"q": d_out}, 50, [4])[0]
    others = [Contribution(dict(own.state), samples=3 + i, peer=f"p{i}") for i in range(6)]
    merged = merge_states(own, others, PRODUCT)
    torch.testing.assert_close(dense_delta(merged, "q"), dense_delta(dict(own.state), "q"),
                               atol=1e-5, rtol=1e-5)
    assert torch.linalg.matrix_rank(merged["q.lora_A.weight"].double()) == 4


def test_zero_b_neighbours_add_nothing_and_an_all_zero_b_keeps_our_a() -> None:
    # Fresh peers (B = 0, as peft initialises it) next to one trained neighbour.
    gen = torch.Generator().manual_seed(5)
    fresh = [adapter(gen, {"q": 30}, 12, 3) for _ in range(3)]
    for state in fresh:
        state["q.lora_B.weight"].zero_()
    trained = adapter(gen, {"q": 30}, 12, 3)
    contributions = [Contribution(fresh[0], 4)] + [
        Contribution(state, 4, peer=f"p{i}") for i, state in enumerate([*fresh[1:], trained])]
    merged = merge_states(contributions[0], contributions[1:], PRODUCT)
    torch.testing.assert_close(dense_delta(merged, "q"), target_delta(contributions, "q"),
                               atol=1e-5, rtol=1e-5)
    # Nobody trained yet: B stays zero and A stays ours, so B's gradient is not zero.
    merged = merge_states(contributions[0], contributions[1:3], PRODUCT)
    torch.testing.assert_close(merged["q.lora_B.weight"], torch.zeros(30, 3))
    torch.testing.assert_close(merged["q.lora_A.weight"], fresh[0]["q.lora_A.weight"])


def test_tiny_singular_values_are_dropped_not_amplified() -> None:
    # ΔW = rank 2 plus a direction 1e-9 its size: far below NULL_RTOL, so it is noise to drop,
    # and dividing by its square root must not blow the A factor up.
    gen = torch.Generator().manual_seed(6)
    b = torch.randn(40, 3, generator=gen, dtype=torch.float64)
    a = torch.randn(3, 30, generator=gen, dtype=torch.float64)
    b[:, 2] *= 1e-9
    proj = project(b[None], a[None], torch.ones(3, dtype=torch.float64), 3)
    own_b, own_a = torch.zeros(1, 40, 3, dtype=torch.float64), torch.ones(1, 3, 30,
                                                                          dtype=torch.float64)
    factors = balanced_factors(proj, own_b, own_a)
    assert torch.isfinite(factors.a).all() and float(factors.a.abs().max()) < 1e3
    torch.testing.assert_close(factors.b[0] @ factors.a[0], b[:, :2] @ a[:2], atol=1e-6, rtol=0)
    assert torch.linalg.matrix_rank(factors.b[0]) == 2


def test_loaded_cholesky_factors_singular_and_rounded_indefinite_grams() -> None:
    gen = torch.Generator().manual_seed(7)
    rank_one = torch.randn(12, 1, generator=gen)
    grams = torch.stack([rank_one @ rank_one.T, torch.zeros(12, 12),
                         torch.eye(12) - 1e-3 * torch.ones(12, 12)])
    grams[0, 0, 0] -= 1e-4 * float(grams[0].diagonal().max())  # indefinite beyond the load
    chol = _loaded_cholesky(grams, 1e-5)
    assert torch.isfinite(chol).all()
    for gram, factor in zip(grams, chol, strict=True):
        # Each factor is exact for gram + eps I, with a small eps >= 0 (1 for an all-zero gram).
        load = factor @ factor.T - gram
        eps = float(load.diagonal().mean())
        assert 0.0 <= eps <= max(1e-2 * float(gram.diagonal().mean()), 1.0)
        torch.testing.assert_close(load, eps * torch.eye(12), atol=1e-5 * (1.0 + eps), rtol=0)
    with pytest.raises(MergeError):
        _loaded_cholesky(torch.full((1, 3, 3), float("nan")), 1e-5)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), d_out=st.integers(1, 30), d_in=st.integers(1, 12),
       own_rank=st.integers(1, 4), ranks=st.lists(st.integers(1, 6), min_size=1, max_size=5),
       modules=st.integers(1, 3))
def test_batched_product_is_optimal_per_module(seed: int, d_out: int, d_in: int, own_rank: int,
                                               ranks: list[int], modules: int) -> None:
    names = MODULES[:modules]
    contributions = swarm(seed, dict.fromkeys(names, d_out), d_in, [own_rank, *ranks])
    merged = merge_states(contributions[0], contributions[1:], PRODUCT)
    for module in names:
        target = target_delta(contributions, module)
        optimal = torch.linalg.svdvals(target)[own_rank:].square().sum().sqrt()
        error = torch.linalg.matrix_norm(target - dense_delta(merged, module))
        assert error <= optimal + 1e-4 * torch.linalg.matrix_norm(target) + 1e-6
        b, a = merged[f"{module}.lora_B.weight"].double(), merged[f"{module}.lora_A.weight"]
        assert b.shape == (d_out, own_rank) and a.shape == (own_rank, d_in)
        if torch.linalg.matrix_rank(target) >= own_rank:
            # Every direction carries a singular value: the factors are balanced, B^T B = A A^T.
            torch.testing.assert_close(b.T @ b, a.double() @ a.double().T, rtol=1e-4,
                                       atol=1e-4 * float(torch.linalg.matrix_norm(target)))


def test_merged_tensors_share_no_storage_so_safetensors_can_save_them(tmp_path: Path) -> None:
    contributions = swarm(8, dict.fromkeys(MODULES, 10), 8, [2, 2, 2])
    merged = merge_states(contributions[0], contributions[1:], PRODUCT)
    storages = {t.untyped_storage().data_ptr() for t in merged.values()}
    assert len(storages) == len(merged)
    save_file(merged, str(tmp_path / "merged.safetensors"))

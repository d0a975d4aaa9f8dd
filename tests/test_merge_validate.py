"""`validate_update` rejects each kind of bad update with its reason, and accepts good ones."""

from __future__ import annotations

import pickle

import pytest
import torch

from merge.config import MergeConfig
from merge.errors import REJECT_REASONS, RejectedUpdate
from merge.tensors import NORM_RMS_FLOOR, padded_distance, state_norm
from merge.validate import MAX_RANK_FACTOR, validate_update

CONFIG = MergeConfig(max_norm_ratio=20.0)


def own_state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "m.q.lora_A.weight": torch.randn(4, 6, generator=gen),
        "m.q.lora_B.weight": torch.randn(8, 4, generator=gen),
        "m.bias": torch.randn(8, generator=gen),
    }


def modified(**changes: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Our state with some tensors replaced (keys given with '.' as '__') or removed (None)."""
    state = own_state()
    for name, tensor in changes.items():
        key = name.replace("__", ".")
        if tensor is None:
            del state[key]
        else:
            state[key] = tensor
    return state


def reason_of(other: dict[str, torch.Tensor], *, allow_rank_change: bool = False) -> str:
    with pytest.raises(RejectedUpdate) as info:
        validate_update(own_state(), other, CONFIG, allow_rank_change=allow_rank_change)
    assert info.value.reason in REJECT_REASONS and info.value.detail
    return info.value.reason


def test_a_good_update_passes() -> None:
    other = {key: 1.5 * t for key, t in own_state().items()}
    validate_update(own_state(), other, CONFIG)


@pytest.mark.parametrize(("other", "reason"), [
    (modified(m__bias=None), "keys_mismatch"),
    ({**own_state(), "m.extra": torch.zeros(1)}, "keys_mismatch"),
    (modified(m__bias=torch.zeros(9)), "shape_mismatch"),
    (modified(m__q__lora_A__weight=torch.zeros(4, 7)), "shape_mismatch"),
    (modified(m__q__lora_B__weight=torch.zeros(9, 4)), "shape_mismatch"),
    (modified(m__q__lora_A__weight=torch.zeros(3, 6)), "shape_mismatch"),  # A and B disagree
    (modified(m__q__lora_A__weight=torch.zeros(3, 6), m__q__lora_B__weight=torch.zeros(8, 3)),
     "rank_mismatch"),
    (modified(m__bias=torch.zeros(8, dtype=torch.float16)), "dtype_mismatch"),
    # The wire format refuses NaN and Inf as "non_finite" (test_wire_adapter); one that gets
    # here anyway makes the norm NaN or Inf, which no bound admits.
    (modified(m__bias=torch.tensor([0.0] * 7 + [float("nan")])), "norm_bound"),
    (modified(m__bias=torch.tensor([0.0] * 7 + [float("-inf")])), "norm_bound"),
    (modified(m__bias=torch.full((8,), 1e3)), "norm_bound"),
    (modified(m__bias=torch.full((8,), 3e38)), "norm_bound"),  # its norm overflows float32
])
def test_each_bad_update_is_rejected_with_its_reason(other: dict[str, torch.Tensor],
                                                     reason: str) -> None:
    assert reason_of(other) == reason


def test_rank_change_passes_only_when_allowed() -> None:
    other = modified(m__q__lora_A__weight=torch.ones(2, 6), m__q__lora_B__weight=torch.ones(8, 2))
    assert reason_of(other) == "rank_mismatch"
    validate_update(own_state(), other, CONFIG, allow_rank_change=True)
    # Allowing a rank change does not allow other dimensions to change.
    wider = modified(m__q__lora_A__weight=torch.ones(2, 7), m__q__lora_B__weight=torch.ones(8, 2))
    assert reason_of(wider, allow_rank_change=True) == "shape_mismatch"


def of_rank(rank: int) -> dict[str, torch.Tensor]:
    return modified(m__q__lora_A__weight=torch.ones(rank, 6) / rank,
                    m__q__lora_B__weight=torch.ones(8, rank) / rank)


def test_product_takes_ranks_up_to_four_times_ours_only() -> None:
    own = own_state()  # rank 4
    largest = MAX_RANK_FACTOR * 4
    validate_update(own, of_rank(largest), CONFIG, allow_rank_change=True)
    assert reason_of(of_rank(largest + 1), allow_rank_change=True) == "rank_mismatch"


def test_a_rank_change_moves_the_rank_and_nothing_else() -> None:
    """The cases `decode_adapter` checked against our shapes before structure moved here."""
    a, b = "m.q_proj.lora_A.weight", "m.q_proj.lora_B.weight"
    own = {a: torch.ones(4, 16), b: torch.ones(24, 4)}

    def reason(other_a: torch.Tensor, other_b: torch.Tensor, allow: bool) -> str:
        with pytest.raises(RejectedUpdate) as info:
            validate_update(own, {a: other_a, b: other_b}, CONFIG, allow_rank_change=allow)
        return info.value.reason

    assert reason(torch.ones(8, 16), torch.ones(24, 8), allow=False) == "rank_mismatch"
    validate_update(own, {a: torch.ones(8, 16), b: torch.ones(24, 8)}, CONFIG,
                    allow_rank_change=True)
    # Only the rank dims may move: a different input width is still a mismatch.
    assert reason(torch.ones(8, 17), torch.ones(24, 8), allow=True) == "shape_mismatch"
    # The two factors of one module must agree on the rank, and it must be at least 1.
    assert reason(torch.ones(8, 16), torch.ones(24, 6), allow=True) == "shape_mismatch"
    assert reason(torch.ones(0, 16), torch.ones(24, 0), allow=True) == "shape_mismatch"


def test_distance_to_an_adapter_of_another_rank_pads_it_with_zeros() -> None:
    own, gen = own_state(), torch.Generator().manual_seed(1)
    other = modified(m__q__lora_A__weight=torch.randn(2, 6, generator=gen),
                     m__q__lora_B__weight=torch.randn(8, 2, generator=gen))
    padded = dict(other)
    padded["m.q.lora_A.weight"] = torch.cat([other["m.q.lora_A.weight"], torch.zeros(2, 6)])
    padded["m.q.lora_B.weight"] = torch.cat([other["m.q.lora_B.weight"], torch.zeros(8, 2)], 1)
    expected = float(torch.cat([(padded[k] - own[k]).flatten() for k in own]).norm())
    assert padded_distance(other, own) == pytest.approx(expected, rel=1e-6)
    assert padded_distance(own, other) == pytest.approx(expected, rel=1e-6)


def test_integer_tensors_are_refused() -> None:
    own = {"x": torch.zeros(3, dtype=torch.int64)}
    with pytest.raises(RejectedUpdate) as info:
        validate_update(own, {"x": torch.zeros(3, dtype=torch.int64)}, CONFIG)
    assert info.value.reason == "dtype_mismatch"


def test_norm_bound_is_relative_to_our_norm() -> None:
    own = own_state()
    norm = float(torch.cat([t.flatten() for t in own.values()]).norm())
    just_inside = {key: 19.9 * t for key, t in own.items()}
    validate_update(own, just_inside, CONFIG)
    just_outside = {key: 20.1 * t for key, t in own.items()}
    assert norm > NORM_RMS_FLOOR
    with pytest.raises(RejectedUpdate, match="norm_bound"):
        validate_update(own, just_outside, CONFIG)


def test_a_reference_replaces_our_norm_as_the_scale() -> None:
    own = own_state()
    norm = state_norm(own)
    # Our own norm is 100 x the reference: the bound follows the reference, not us.
    huge = {key: 100.0 * t for key, t in own.items()}
    big = {key: 1.5 * t for key, t in huge.items()}  # within 20 x our norm, not of the reference
    validate_update(huge, big, CONFIG)
    with pytest.raises(RejectedUpdate, match="norm_bound"):
        validate_update(huge, big, CONFIG, reference=norm)
    assert validate_update(own, big, CONFIG, reference=10 * norm) == pytest.approx(
        state_norm(big), rel=1e-6)


def test_the_distance_is_bounded_as_well_as_the_norm() -> None:
    own = own_state()
    norm = state_norm(own)
    reference = norm / 10  # bound: 2 x our norm
    validate_update(own, {key: 1.5 * t for key, t in own.items()}, CONFIG, reference=reference)
    # Of an ordinary norm, but flipped: 2.5 x our norm away.
    flipped = {key: -1.5 * t for key, t in own.items()}
    with pytest.raises(RejectedUpdate, match="norm_bound: distance"):
        validate_update(own, flipped, CONFIG, reference=reference)


@pytest.mark.parametrize("reference", [0.0, -1.0, float("nan"), float("inf")])
def test_a_bad_reference_is_the_callers_bug(reference: float) -> None:
    with pytest.raises(ValueError, match="reference"):
        validate_update(own_state(), own_state(), CONFIG, reference=reference)


def test_an_all_zero_state_still_accepts_small_updates() -> None:
    zero = {"m.q.lora_A.weight": torch.zeros(4, 6), "m.q.lora_B.weight": torch.zeros(8, 4)}
    small = {key: torch.full(t.shape, 5 * NORM_RMS_FLOOR) for key, t in zero.items()}
    validate_update(zero, small, CONFIG)
    large = {key: torch.full(t.shape, 50 * NORM_RMS_FLOOR) for key, t in zero.items()}
    with pytest.raises(RejectedUpdate, match="norm_bound"):
        validate_update(zero, large, CONFIG)


def test_rejected_update_survives_copying_and_refuses_unknown_reasons() -> None:
    error = RejectedUpdate("norm_bound", "too\nlarge")
    assert str(error) == "norm_bound: too large"
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.reason, copy.detail) == ("norm_bound", "too large")
    with pytest.raises(ValueError):
        RejectedUpdate("bad_vibes", "?")

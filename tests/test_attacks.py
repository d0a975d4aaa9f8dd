"""Poisoned adapters served by Byzantine peers in robustness experiments."""

from __future__ import annotations

import pytest
import torch

from peer.attacks import ATTACKS, poison
from peer.config import PeerConfig


def _state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {"x.lora_A.weight": torch.randn(4, 16), "x.lora_B.weight": torch.randn(16, 4) * 0.01}


def test_scale_and_signflip() -> None:
    state = _state()
    scaled = poison(state, "scale", scale=50)
    flipped = poison(state, "signflip", scale=2)
    for key, value in state.items():
        assert torch.allclose(scaled[key], value * 50)
        assert torch.allclose(flipped[key], value * -2)


def test_noise_is_loud_random_and_seeded() -> None:
    state = _state()
    noisy = poison(state, "noise", scale=50, seed=1)
    again = poison(state, "noise", scale=50, seed=1)
    for key, value in state.items():
        assert noisy[key].shape == value.shape and noisy[key].dtype == value.dtype
        assert torch.equal(noisy[key], again[key])
        assert noisy[key].norm() > 10 * value.norm()


def test_unknown_attack() -> None:
    with pytest.raises(ValueError, match="unknown attack"):
        poison(_state(), "bribe")
    with pytest.raises(ValueError, match="unknown attack"):
        PeerConfig(data_dir="d", train_path="t", attack="bribe")  # type: ignore[arg-type]


def test_every_attack_keeps_keys_and_shapes() -> None:
    state = _state()
    for attack in ATTACKS:
        out = poison(state, attack)
        assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in state.items()}

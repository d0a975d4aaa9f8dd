"""Swarm identity: equal settings give one id, any difference gives another."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gossip.swarm import PROTOCOL_VERSION, TRANSFER_PROTOCOL, swarm_hex, swarm_id, topic_name

LORA: dict[str, Any] = {"r": 8, "alpha": 16.0, "targets": ["q_proj", "v_proj"],
                        "extra": {"dropout": 0.05, "bias": None}}


def test_shape_and_stability() -> None:
    sid = swarm_id("model-fp", LORA, 7)
    assert isinstance(sid, bytes) and len(sid) == 16
    assert swarm_id("model-fp", dict(LORA), 7, PROTOCOL_VERSION) == sid
    # Pinned: the id must not drift between releases, or upgraded peers would split the swarm.
    # sha256(b"loraswarm/swarm-id\0" + b'{"lora":{"r":8},"model":"fp","protocol":2,"seed":0}');
    # a protocol bump moves it on purpose: peers that cannot talk must not share a topic.
    assert swarm_hex(swarm_id("fp", {"r": 8}, 0, 2)) == "fb12cbe0a87df4d92c45f408d6ffdaad"
    assert swarm_hex(swarm_id("fp", {"r": 8}, 0, 3)) == "026ffba2763f35bcaec43f780f4066e8"
    assert swarm_hex(swarm_id("fp", {"r": 8}, 0, 4)) == "7c0b4059cbf65aad4309880406a10f3f"


def test_each_input_changes_the_id() -> None:
    sid = swarm_id("model-fp", LORA, 7)
    others = [
        swarm_id("model-fp2", LORA, 7),
        swarm_id("model-fp", {**LORA, "r": 4}, 7),
        swarm_id("model-fp", {**LORA, "targets": ["q_proj"]}, 7),
        swarm_id("model-fp", {**LORA, "extra": {"dropout": 0.1, "bias": None}}, 7),
        swarm_id("model-fp", {**LORA, "new": 1}, 7),
        swarm_id("model-fp", LORA, 8),
        swarm_id("model-fp", LORA, 7, PROTOCOL_VERSION + 1),
    ]
    assert len({sid, *others}) == len(others) + 1


def test_key_order_does_not_matter() -> None:
    reordered = {"extra": {"bias": None, "dropout": 0.05}, "targets": ["q_proj", "v_proj"],
                 "alpha": 16.0, "r": 8}
    assert list(reordered) != list(LORA)
    assert swarm_id("model-fp", reordered, 7) == swarm_id("model-fp", LORA, 7)


def test_list_order_and_types_do_matter() -> None:
    base = swarm_id("fp", LORA, 7)
    assert swarm_id("fp", {**LORA, "targets": ["v_proj", "q_proj"]}, 7) != base
    assert swarm_id("fp", {"r": "8"}, 7) != swarm_id("fp", {"r": 8}, 7)
    assert swarm_id("fp", {"r": True}, 7) != swarm_id("fp", {"r": 1}, 7)


def test_integral_floats_and_tuples_have_one_spelling() -> None:
    # A TOML `alpha = 16` and a default `alpha = 16.0` are the same LoRA: one swarm, not two.
    assert swarm_id("fp", {**LORA, "alpha": 16}, 7) == swarm_id("fp", LORA, 7)
    assert swarm_id("fp", {**LORA, "targets": ("q_proj", "v_proj")}, 7) == swarm_id("fp", LORA, 7)


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.text(max_size=6), st.integers() | st.text(max_size=6) | st.booleans(),
                       max_size=6), st.randoms(use_true_random=False))
def test_key_order_generated(lora: dict[str, Any], rng: Any) -> None:
    items = list(lora.items())
    rng.shuffle(items)
    assert swarm_id("fp", dict(items), 1) == swarm_id("fp", lora, 1)


@pytest.mark.parametrize("args", [
    ("", LORA, 7), (b"fp", LORA, 7), ("fp", [("r", 8)], 7), ("fp", LORA, 7.0),
    ("fp", LORA, True), ("fp", {"r": float("nan")}, 7), ("fp", {1: 8}, 7),
    ("fp", {"r": {1, 2}}, 7), ("fp", {"x": object()}, 7),
])
def test_invalid_inputs(args: tuple[Any, Any, Any]) -> None:
    with pytest.raises(ValueError):
        swarm_id(*args)


@pytest.mark.parametrize("version", [0, -1, True, 1.0])
def test_invalid_protocol_version(version: Any) -> None:
    with pytest.raises(ValueError):
        swarm_id("fp", LORA, 7, protocol_version=version)


def test_names() -> None:
    sid = bytes(range(16))
    assert swarm_hex(sid) == "000102030405060708090a0b0c0d0e0f"
    assert topic_name(sid) == "/loraswarm/000102030405060708090a0b0c0d0e0f/adapters/1"
    assert TRANSFER_PROTOCOL == "/loraswarm/adapter/4"
    for bad in (sid[:15], sid + b"\0", sid.hex()):
        with pytest.raises(ValueError):
            swarm_hex(bad)  # type: ignore[arg-type]

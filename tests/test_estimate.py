"""Public estimates with error feedback (gossip.estimate): chains, keyframes, corruption."""

from __future__ import annotations

import hashlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gossip.codec import encode_adapter
from gossip.compress import parse_codec, shapes_of
from gossip.errors import WIRE_REASONS, WireError
from gossip.estimate import (
    NO_DIGEST,
    EstimateStep,
    PublicEstimate,
    decode_update,
    encode_update,
    estimate_digest,
)
from gossip.replicas import EstimateReplica

FAST = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CAP = 1 << 22


def adapter(gen: torch.Generator, scale: float = 1.0, width: int = 1) -> dict[str, torch.Tensor]:
    return {"l0.lora_A.weight": scale * torch.randn(8, 48 * width, generator=gen),
            "l0.lora_B.weight": scale * torch.randn(40 * width, 8, generator=gen),
            "l1.lora_A.weight": scale * torch.randn(8, 48 * width, generator=gen)}


def zeros_like(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.zeros_like(v) for k, v in state.items()}


def replica_of(state: dict[str, torch.Tensor]) -> EstimateReplica:
    return EstimateReplica(shapes_of(state), max_payload_bytes=CAP)


def sync(server: PublicEstimate, replica: EstimateReplica) -> tuple[EstimateStep, ...]:
    """One fetch, through the update's wire encoding."""
    update = server.update_for(replica.held())
    if update:
        update = decode_update(encode_update(update), max_bytes=CAP)
    replica.apply(update)
    return update


def identical(server: PublicEstimate, replica: EstimateReplica) -> bool:
    held = replica.estimate
    assert held is not None
    return (replica.version == (server.version, server.digest)
            and all(torch.equal(held[k], v) for k, v in server.estimate.items()))


def residual(x: dict[str, torch.Tensor], server: PublicEstimate) -> float:
    return float(sum(((x[k] - v) ** 2).sum() for k, v in server.estimate.items())) ** 0.5


def test_the_digest_is_sha256_of_the_canonical_float32_safetensors() -> None:
    state = adapter(torch.Generator().manual_seed(0))
    shuffled = dict(reversed(list(state.items())))
    assert estimate_digest(shuffled) == hashlib.sha256(encode_adapter(state)).digest()
    with pytest.raises(ValueError):
        estimate_digest({k: v.double() for k, v in state.items()})


@pytest.mark.parametrize("spec", ["bf16", "int8+zstd", "topk:0.05", "topk:0.05+zstd", "fp32"])
def test_a_replica_rebuilds_the_estimate_bit_for_bit_across_a_chain(spec: str) -> None:
    gen = torch.Generator().manual_seed(1)
    x = adapter(gen)
    server = PublicEstimate(zeros_like(x), parse_codec(spec), keep=32)
    replica = replica_of(x)
    assert sync(server, replica)[0].is_keyframe
    chained = 0
    for _ in range(24):  # training moves x each round; the replica follows delta by delta
        x = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in x.items()}
        server.step(x)
        update = sync(server, replica)
        chained += not update[0].is_keyframe
        assert identical(server, replica)
    # fp32 deltas are as large as a keyframe, so they travel as keyframes; the others chain.
    assert chained == (0 if spec == "fp32" else 24)
    # A late joiner, from a keyframe, and a replica that took one long chain agree too.
    late = replica_of(x)
    sync(server, late)
    assert identical(server, late)


def test_a_chain_of_many_steps_in_one_update() -> None:
    gen = torch.Generator().manual_seed(2)
    x = adapter(gen, width=10)
    # 20 steps of topk:0.01 cost about 20 x 0.01 x 5 = 1 byte per entry, a dense keyframe 4.
    server = PublicEstimate(x, parse_codec("topk:0.01+zstd"), keep=24)
    replica = replica_of(x)
    sync(server, replica)
    for _ in range(20):
        server.step({k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in x.items()})
    update = sync(server, replica)
    assert len(update) == 20 and not update[0].is_keyframe
    assert identical(server, replica)


def test_error_feedback_delivers_what_topk_left_behind() -> None:
    # CHOCO's property: a fixed x is reached by repeated compressed steps, nothing is lost.
    x = adapter(torch.Generator().manual_seed(3))
    server = PublicEstimate(zeros_like(x), parse_codec("topk:0.05"))
    norms = [residual(x, server)]
    for _ in range(60):
        server.step(x)
        norms.append(residual(x, server))
    assert norms[20] < 0.5 * norms[0]
    assert norms[-1] < 1e-3 * norms[0]
    assert all(later <= earlier * 1.001 for earlier, later in zip(norms, norms[1:], strict=False))


def test_a_replica_behind_the_kept_steps_gets_a_keyframe() -> None:
    gen = torch.Generator().manual_seed(4)
    x = adapter(gen, width=10)
    server = PublicEstimate(x, parse_codec("topk:0.05+zstd"), keep=3)
    replica = replica_of(x)
    sync(server, replica)
    for _ in range(3):
        server.step(adapter(gen, width=10))
    assert not sync(server, replica)[0].is_keyframe  # exactly 3 behind: still chained
    for _ in range(4):
        server.step(adapter(gen, width=10))
    update = sync(server, replica)
    assert len(update) == 1 and update[0].is_keyframe
    assert identical(server, replica)
    assert server.update_for(replica.held()) == ()  # up to date
    assert server.statistics().history_steps == 3


def test_history_is_bounded_in_bytes() -> None:
    gen = torch.Generator().manual_seed(5)
    x = adapter(gen)
    server = PublicEstimate(zeros_like(x), parse_codec("bf16"), keep=100, max_history_bytes=5000)
    size = len(server.step(adapter(gen)).payload)  # bf16 steps all have one size
    for _ in range(10):
        server.step(adapter(gen))
    stats = server.statistics()
    assert stats.history_bytes <= 5000 and stats.history_steps == 5000 // size


def corrupt(step: EstimateStep, at: int) -> EstimateStep:
    payload = bytearray(step.payload)
    payload[at] ^= 0x40
    return EstimateStep(step.base_version, step.base_digest, step.version, step.digest,
                        bytes(payload))


@pytest.mark.parametrize("spec", ["int8", "topk:0.05+zstd", "bf16"])
def test_a_corrupted_step_is_rejected_and_a_keyframe_recovers(spec: str) -> None:
    gen = torch.Generator().manual_seed(6)
    x = adapter(gen)
    server = PublicEstimate(x, parse_codec(spec), keep=8)
    replica = replica_of(x)
    sync(server, replica)
    before = replica.version
    chain = tuple(server.step(adapter(gen)) for _ in range(3))
    # The last value byte, a middle byte, a header byte; alone, or in the middle of a chain.
    spoiled = [[corrupt(chain[0], at)] for at in (-1, -7, 30)]
    spoiled.append([chain[0], corrupt(chain[1], -1), chain[2]])
    for update in spoiled:
        with pytest.raises(WireError) as caught:
            replica.apply(update)
        assert caught.value.reason in {"estimate_mismatch", "bad_codec", "malformed",
                                       "non_finite", "truncated"}
        assert replica.version == before and replica.held() is None  # nothing half-applied
    assert sum(replica.stats.rejected.values()) == 4
    recovery = sync(server, replica)  # held() is None: the server sends a keyframe
    assert recovery[0].is_keyframe and identical(server, replica)
    server.step(adapter(gen))
    assert not sync(server, replica)[0].is_keyframe  # and deltas resume


def test_a_delta_against_another_base_is_rejected() -> None:
    gen = torch.Generator().manual_seed(7)
    x = adapter(gen)
    server = PublicEstimate(zeros_like(x), parse_codec("int8"))
    replica = replica_of(x)
    with pytest.raises(WireError, match="wrong_base"):  # nothing held yet
        replica.apply([server.step(x)])
    sync(server, replica)
    first = server.step(adapter(gen))
    second = server.step(adapter(gen))
    with pytest.raises(WireError, match="wrong_base"):  # skips a step
        replica.apply([second])
    with pytest.raises(WireError, match="bad_field"):  # does not link
        replica.apply([second, first])
    sync(server, replica)
    third = server.step(adapter(gen))
    lie = EstimateStep(third.base_version, third.base_digest, third.version, b"\1" * 32,
                       third.payload)
    with pytest.raises(WireError, match="estimate_mismatch"):
        replica.apply([lie])


def test_step_fields_are_checked() -> None:
    good = dict(base_version=3, base_digest=b"\2" * 32, version=4, digest=b"\3" * 32,
                payload=b"x")
    for spoil in ({"version": 3}, {"base_version": -2}, {"digest": b"\3" * 31},
                  {"base_digest": NO_DIGEST}, {"base_version": -1}, {"payload": b""},
                  {"version": True}, {"payload": "x"}):
        with pytest.raises(WireError, match="bad_field"):
            EstimateStep(**{**good, **spoil})  # type: ignore[arg-type]


def test_updates_are_bounded() -> None:
    gen = torch.Generator().manual_seed(8)
    server = PublicEstimate(adapter(gen), parse_codec("int8"), keep=10)
    chain = tuple(server.step(adapter(gen)) for _ in range(5))
    data = encode_update(chain)
    assert decode_update(data, max_bytes=len(data)) == chain
    with pytest.raises(WireError, match="oversized"):
        decode_update(data, max_bytes=len(data) - 1)
    with pytest.raises(WireError):
        decode_update(data, max_bytes=CAP, max_steps=4)


@given(st.binary(max_size=300), st.booleans())
@FAST
def test_hostile_updates_raise_only_wire_errors(data: bytes, magic: bool) -> None:
    try:
        decode_update(b"LSE1" + data if magic else data, max_bytes=CAP)
    except WireError as exc:
        assert exc.reason in WIRE_REASONS


def test_estimates_are_handed_out_as_copies() -> None:
    x = adapter(torch.Generator().manual_seed(9))
    server = PublicEstimate(x, parse_codec("int8"))
    replica = replica_of(x)
    sync(server, replica)
    for held in (server.estimate, replica.estimate):
        assert held is not None
        for t in held.values():
            t.add_(1.0)  # a caller merging in place must not move x̂ under its digest
    assert identical(server, replica) and server.digest == estimate_digest(server.estimate)

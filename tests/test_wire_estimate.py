"""Public estimates on the wire (issue 14): real GossipNodes on 127.0.0.1 serve their estimate
x̂ and fetch each other's as deltas against the version they hold, rebuilt bit for bit."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
import torch
import trio

from gossip.compress import parse_codec
from gossip.errors import WireError
from gossip.estimate import PublicEstimate
from gossip.node import GossipNode, NodeConfig
from gossip.replicas import EstimateReplica, Replicas, max_update_bytes
from gossip.swarm import swarm_id
from gossip.transfer import Body, Offer
from gossip.wire import Announcement, digest, signed_offer

SWARM = swarm_id("model-fingerprint", {"r": 4}, 0)
SHAPES = {"m.lora_A.weight": (8, 256), "m.lora_B.weight": (256, 8)}


@contextlib.asynccontextmanager
async def pair() -> AsyncIterator[tuple[GossipNode, GossipNode]]:
    async with trio.open_nursery() as nursery:
        server, client = (GossipNode(NodeConfig(min_upload_interval_s=0), SWARM, None)
                          for _ in range(2))
        for node in (server, client):
            await nursery.start(node.run)
        with trio.fail_after(10):
            await client.connect(server.listen_addrs[0])
        client.expect_shapes(SHAPES)
        yield server, client
        nursery.cancel_scope.cancel()


def adapter(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator) for name, shape in SHAPES.items()}


def trained(state: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
    """`state` after `step` small training steps: what moves an adapter round to round."""
    generator = torch.Generator().manual_seed(1000 + step)
    return {name: t + 0.01 * torch.randn(t.shape, generator=generator)
            for name, t in state.items()}


def serve(server: GossipNode, estimate: PublicEstimate) -> Announcement:
    server.serve(Offer(version=estimate.version, samples=16, estimate=estimate.snapshot()))
    return Announcement(swarm=SWARM, peer=server.peer_id, version=estimate.version, samples=16,
                        digest=estimate.digest, nbytes=len(estimate.keyframe().payload),
                        train_loss=1.0, addrs=tuple(server.listen_addrs))


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("codec", ["int8+zstd", "topk:0.05+zstd"])
async def test_a_delta_chain_rebuilds_the_estimate_bit_for_bit(codec: str) -> None:
    async with pair() as (server, client):
        x = adapter(0)
        estimate = PublicEstimate(x, parse_codec(codec), version=1)
        with trio.fail_after(20):
            first = await client.receive(serve(server, estimate))
        assert first.version == 1 and same(first.state, estimate.estimate)
        for version in range(2, 6):
            x = trained(x, version)
            estimate.step(x, version=version)
        with trio.fail_after(20):
            fifth = await client.receive(serve(server, estimate))
        # Four steps since version 1, sent as a chain: fewer bytes than the keyframe was.
        assert fifth.version == 5 and same(fifth.state, estimate.estimate)
        assert fifth.nbytes < first.nbytes
        assert estimate.statistics().served_chains == 0  # the server's snapshot answered
        assert client.bytes_in == first.nbytes + fifth.nbytes and not client.rejected


async def test_two_fetches_from_one_peer_at_once_take_turns() -> None:
    """Both would ask for the steps since the same version (and the server refuses a second
    upload to one peer as "busy"): the second waits, then finds its replica up to date."""
    async with pair() as (server, client):
        x = adapter(3)
        estimate = PublicEstimate(x, parse_codec("int8+zstd"), version=1)
        with trio.fail_after(20):
            await client.receive(serve(server, estimate))
        estimate.step(trained(x, 2), version=2)
        announcement = serve(server, estimate)
        got: list[Any] = []

        async def receive() -> None:
            got.append(await client.receive(announcement))

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(receive)
                nursery.start_soon(receive)
        assert [r.version for r in got] == [2, 2] and not client.rejected
        assert all(same(r.state, estimate.estimate) for r in got)
        assert server.server.served_kinds == {"keyframe": 1, "delta": 1, "current": 1}
        assert client.replicas.statistics() == {"held": 1, "keyframes": 1, "chains": 1,
                                                "steps": 2}


async def test_a_client_whose_base_is_gone_gets_a_keyframe() -> None:
    async with pair() as (server, client):
        x = adapter(1)
        estimate = PublicEstimate(x, parse_codec("int8+zstd"), version=1, keep=2)
        with trio.fail_after(20):
            first = await client.receive(serve(server, estimate))
        for version in range(2, 6):  # version 1's successor falls out of the history
            x = trained(x, version)
            estimate.step(x, version=version)
        with trio.fail_after(20):
            again = await client.receive(serve(server, estimate))
        assert again.version == 5 and same(again.state, estimate.estimate)
        assert again.nbytes >= first.nbytes * 0.9  # a keyframe again, not a chain


async def test_a_corrupted_delta_is_rejected_and_the_next_fetch_gets_a_keyframe() -> None:
    async with pair() as (server, client):
        x = adapter(2)
        estimate = PublicEstimate(x, parse_codec("int8+zstd"), version=1)
        with trio.fail_after(20):
            await client.receive(serve(server, estimate))
        held = estimate.digest
        x = trained(x, 2)
        estimate.step(x, version=2)
        announcement = serve(server, estimate)
        honest = server.server.body_for
        asked: list[Any] = []

        async def corrupting(offer: Offer, held: tuple[int, bytes] | None) -> Body:
            """The honest update, one payload byte changed, re-signed: well formed, but wrong."""
            asked.append(held)
            body = await honest(offer, held)
            if held is None:
                return body
            data = bytearray(body.data)
            data[-1] ^= 0x01  # the last byte of the last step's payload
            bad = bytes(data)
            signature = server.host.get_private_key().sign(signed_offer(
                SWARM, server.peer_id, offer.version, offer.samples, len(bad), offer.digest,
                digest(bad), offer.privacy))
            return Body(bad, digest(bad), signature)

        server.server.body_for = corrupting  # type: ignore[method-assign]
        with trio.fail_after(20), pytest.raises(WireError):
            await client.receive(announcement)
        assert sum(client.rejected.values()) == 1
        with trio.fail_after(20):
            recovered = await client.receive(announcement)
        assert asked == [(1, held), None]  # a delta from version 1, then a keyframe
        assert recovered.version == 2 and same(recovered.state, estimate.estimate)


async def test_an_update_bound_follows_our_shapes() -> None:
    # A float32 keyframe plus framing (zstd may expand incompressible bytes a little; a chain is
    # sent only when smaller than the keyframe): about the adapter's size, not the cap's.
    fp32 = 4 * sum(r * c for r, c in SHAPES.values())
    for codec in ("fp32", "fp32+zstd"):
        keyframe = len(PublicEstimate(adapter(3), parse_codec(codec)).keyframe().payload)
        assert keyframe < max_update_bytes(SHAPES) < fp32 * 1.02 + 16 * 1024
    assert max_update_bytes(SHAPES, rank_factor=4) > 4 * fp32


def test_replicas_are_bounded_and_forgotten() -> None:
    replicas = Replicas(cap_bytes=1 << 20, max_replicas=2)
    replicas.expect(SHAPES)
    made = [EstimateReplica(SHAPES, max_payload_bytes=1024) for _ in range(3)]
    for peer, replica in zip("abc", made, strict=True):
        replicas.keep(peer, replica)
    assert len(replicas) == 2 and replicas.get("a") is None  # the least recent went first
    replicas.forget("b")
    assert replicas.get("b") is None and replicas.get("c") is made[2]
    replicas.expect({"m.lora_A.weight": (4, 256)})  # other shapes: nothing held still fits
    assert len(replicas) == 0 and replicas.bound == max_update_bytes({"m.lora_A.weight": (4, 256)})


async def test_a_first_fetch_is_a_chain_from_the_swarm_seeded_origin() -> None:
    """Every peer starts at the same seeded adapter (version 0), so a neighbour we never
    fetched from still sends only its steps; one whose origin differs sends a keyframe."""
    async with pair() as (server, client):
        origin = adapter(4)
        client.expect_shapes(SHAPES, origin=origin)
        estimate = PublicEstimate(origin, parse_codec("topk:0.05+zstd"), version=0)
        x = origin
        for version in range(1, 4):
            x = trained(x, version)
            estimate.step(x, version=version)
        with trio.fail_after(20):
            first = await client.receive(serve(server, estimate))
        assert first.version == 3 and same(first.state, estimate.estimate)
        assert first.nbytes < len(estimate.keyframe().payload) / 3
        assert server.server.served_kinds == {"delta": 1}
        assert client.replicas.statistics()["chains"] == 1 and not client.rejected

        stranger = PublicEstimate(adapter(5), parse_codec("topk:0.05+zstd"), version=0)
        stranger.step(trained(adapter(5), 1), version=4)  # another origin: a chain from it
        client.replicas.forget(server.peer_id)  # would not rebuild ours, so a keyframe comes
        with trio.fail_after(20):
            other = await client.receive(serve(server, stranger))
        assert other.version == 4 and same(other.state, stranger.estimate)
        assert server.server.served_kinds == {"delta": 1, "keyframe": 1}


def test_after_a_rejection_a_peer_is_asked_for_a_keyframe_not_a_chain() -> None:
    replicas = Replicas(cap_bytes=1 << 20)
    origin = adapter(6)
    replicas.expect(SHAPES, origin=origin)
    start = PublicEstimate(origin, parse_codec("fp32"))
    assert replicas.held("a") == (0, start.digest)  # nothing of a's yet: the origin
    replicas.refuse("a")
    assert replicas.held("a") is None and replicas.held("b") == (0, start.digest)


async def test_a_neighbour_still_at_the_origin_is_up_to_date_at_once() -> None:
    """A peer that joined and has not trained serves version 0, the origin itself: a client
    that holds only the origin gets an empty update, and takes it."""
    async with pair() as (server, client):
        origin = adapter(7)
        client.expect_shapes(SHAPES, origin=origin)
        estimate = PublicEstimate(origin, parse_codec("topk:0.05+zstd"), version=0)
        with trio.fail_after(20):
            got = await client.receive(serve(server, estimate))
        assert got.version == 0 and same(got.state, origin) and not client.rejected
        assert server.server.served_kinds == {"current": 1}

"""The WAN emulator (`testbed.wan`): delay, rate, jitter, order and cuts, measured on loopback.

Lower bounds are strict (shaping can only add time); upper bounds allow 10 %, over transfers
long enough (seconds, medians of a few trials) that a loaded two-core machine's scheduling
noise stays well under that.
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import AsyncIterator

import pytest
import torch
import trio

from gossip.estimate import encode_update
from gossip.node import GossipNode, NodeConfig
from gossip.swarm import swarm_id
from gossip.wire import Announcement, digest, encode_adapter
from testbed.wan import Link, LinkProxy
from topology.config import TopologyConfig

# Bounds on shaped links' round trips: alone, not beside another worker.
pytestmark = pytest.mark.serial

SWARM = swarm_id("wan-model", {"r": 4}, 0)


async def _echo(stream: trio.SocketStream) -> None:
    with contextlib.suppress(trio.BrokenResourceError):
        async for data in stream:
            await stream.send_all(data)


@contextlib.asynccontextmanager
async def proxied(link: Link, handler=_echo) -> AsyncIterator[LinkProxy]:
    """A server running `handler` on 127.0.0.1, behind a `LinkProxy` of `link`."""
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, handler, 0)
        port = listeners[0].socket.getsockname()[1]
        proxy = await nursery.start(LinkProxy(link, ("127.0.0.1", port), seed=1).run)
        yield proxy
        nursery.cancel_scope.cancel()


async def _round_trip(stream: trio.SocketStream, payload: bytes = b"ping") -> float:
    started = trio.current_time()
    await stream.send_all(payload)
    got = b""
    while len(got) < len(payload):
        got += await stream.receive_some()
    assert got == payload
    return trio.current_time() - started


@pytest.mark.parametrize("text, link", [
    ("delay=50ms,rate=20mbit,jitter=10ms", Link(0.05, 20e6, 0.01)),
    ("rate=1.5Gbit", Link(rate_bps=1.5e9)),
    (" delay = 1s , rate=500kbit ", Link(delay_s=1.0, rate_bps=5e5)),
])
def test_link_strings_parse(text: str, link: Link) -> None:
    assert Link.parse(text) == link
    assert Link.parse(str(link)) == link


@pytest.mark.parametrize("text, says", [
    ("", "empty link"), ("delay=50", "bad delay"), ("delay=50mbit", "bad delay"),
    ("rate=20ms", "bad rate"), ("loss=1%", "bad link item"), ("delay=-5ms", "bad delay"),
    ("delay=5ms,delay=6ms", "given twice"), ("delay=5ms,jitter=6ms", "cannot exceed"),
    ("delay=nanms", "bad delay"),
])
def test_bad_link_strings_are_rejected_in_one_line(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says) as info:
        Link.parse(text)
    assert "\n" not in str(info.value)


async def test_round_trip_is_twice_the_delay_after_the_handshakes() -> None:
    firsts = []
    async with proxied(Link(delay_s=0.05)) as proxy:
        for _ in range(3):
            stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
            # Behind TCP's handshake: the SYN, the SYN-ACK, then the data and its echo.
            firsts.append(await _round_trip(stream))
            rtts = [await _round_trip(stream) for _ in range(5)]
            await stream.aclose()
    assert min(firsts) >= 0.2 and statistics.median(firsts) <= 0.2 * 1.1, firsts
    assert min(rtts) >= 0.1, rtts
    assert statistics.median(rtts) <= 0.1 * 1.1, rtts


def _sink(nbytes: int, done: trio.Event, times: list[float]):
    """A handler that reads `nbytes` in all (over any connections), then sets `done`."""
    got = [0]

    async def handler(stream: trio.SocketStream) -> None:
        async for data in stream:
            got[0] += len(data)
            if got[0] >= nbytes and not done.is_set():
                times.append(trio.current_time())
                done.set()

    return handler


async def _push(port: int, nbytes: int) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"x" * nbytes)
        await stream.send_eof()


@pytest.mark.parametrize("connections", [1, 2])
async def test_rate_is_what_was_asked_shared_by_all_connections(connections: int) -> None:
    """3 MB at 20 Mbit/s: 1.2 s, plus the handshake's round trip and the delay; two
    connections share the one link."""
    link, nbytes = Link(delay_s=0.02, rate_bps=20e6), 3_000_000
    expected = nbytes * 8 / link.rate_bps + 3 * link.delay_s
    took = []
    for _ in range(3):
        done, times = trio.Event(), []
        async with proxied(link, _sink(nbytes, done, times)) as proxy:
            started = trio.current_time()
            async with trio.open_nursery() as nursery:
                for _ in range(connections):
                    nursery.start_soon(_push, proxy.port, nbytes // connections)
            with trio.fail_after(10):
                await done.wait()
            took.append(times[0] - started)
            assert proxy.statistics().bytes_down == nbytes
    assert min(took) >= expected, took
    assert statistics.median(took) <= expected * 1.1, took


async def test_jitter_stays_within_its_bounds_and_varies() -> None:
    async with proxied(Link(delay_s=0.03, jitter_s=0.02)) as proxy:
        stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
        await _round_trip(stream)  # past the handshake
        rtts = [await _round_trip(stream) for _ in range(20)]
        await stream.aclose()
    assert min(rtts) >= 2 * 0.01, rtts
    assert max(rtts) <= 2 * 0.05 + 0.02, rtts
    assert max(rtts) - min(rtts) > 0.01, rtts  # it does vary


async def test_jitter_never_reorders_bytes() -> None:
    """Messages sent 1 ms apart, each delayed 0-40 ms at random, arrive in the order sent."""
    sent = b"".join(b"%05d;" % i for i in range(300))
    async with proxied(Link(delay_s=0.02, jitter_s=0.02)) as proxy:
        stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
        got = bytearray()

        async def receive() -> None:
            while len(got) < len(sent):
                got.extend(await stream.receive_some())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            for i in range(0, len(sent), 6):
                await stream.send_all(sent[i:i + 6])
                await trio.sleep(0.001)  # separate chunks, each with its own jitter draw
        await stream.aclose()
    assert bytes(got) == sent


async def test_cut_drops_open_connections_and_new_ones_work() -> None:
    async with proxied(Link(delay_s=0.01)) as proxy:
        first = await trio.open_tcp_stream("127.0.0.1", proxy.port)
        await _round_trip(first)
        assert proxy.cut() == 1
        # A reset (BrokenResourceError) is a dropped connection too.
        with trio.fail_after(5), contextlib.suppress(trio.BrokenResourceError):
            assert await first.receive_some() == b""
        second = await trio.open_tcp_stream("127.0.0.1", proxy.port)
        assert await _round_trip(second) >= 0.02
        stats = proxy.statistics()
        assert stats.cut == 1 and stats.connections == 2 and stats.open == 1
        await first.aclose()
        await second.aclose()


async def test_unreachable_target_closes_the_client() -> None:
    with trio.socket.socket() as unused:
        await unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # bound, never listening: connections are refused
        async with trio.open_nursery() as nursery:
            proxy = await nursery.start(LinkProxy(Link(), ("127.0.0.1", port)).run)
            stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
            with trio.fail_after(5):
                assert await stream.receive_some() == b""
            assert proxy.statistics().failed_dials == 1
            nursery.cancel_scope.cancel()


async def test_libp2p_fetch_through_the_link() -> None:
    """A 1 MiB adapter over 50 ms / 20 Mbit/s: Noise authenticates the real peer behind the
    proxy, and the fetch takes at least the bytes' time on the link plus a round trip."""
    link = Link(delay_s=0.05, rate_bps=20e6)
    state = {"m.lora_A.weight": torch.full((4, 65536), 0.5),
             "m.lora_B.weight": torch.zeros(65536, 4)}
    data = encode_adapter(state)
    async with trio.open_nursery() as nursery:
        server = await nursery.start(GossipNode(NodeConfig(), SWARM, identity_dir=None).run)
        client = await nursery.start(GossipNode(NodeConfig(), SWARM, identity_dir=None).run)
        real = server.listen_addrs[0].split("/")
        proxy = await nursery.start(LinkProxy(link, (real[2], int(real[4]))).run)
        offer = server.offer(1, 16, state)  # an fp32 keyframe: these bytes, framed
        started = trio.current_time()
        with trio.fail_after(20):
            assert await client.connect(f"{proxy.multiaddr}/p2p/{server.peer_id}") \
                == server.peer_id
        connected = trio.current_time()
        announcement = Announcement(
            swarm=SWARM, peer=server.peer_id, version=1, samples=16, digest=digest(data),
            nbytes=len(data), train_loss=1.0, addrs=(f"{proxy.multiaddr}/p2p/{server.peer_id}",))
        with trio.fail_after(20):
            fetched = await client.fetch(announcement)
        finished = trio.current_time()
        assert fetched.data == encode_update(offer.estimate.update_for(None))
        assert fetched.digest == digest(data)  # fp32: the estimate digest is the adapter's
        assert connected - started >= 2 * 2 * link.delay_s  # Noise and muxer: 2 RTTs at least
        assert finished - connected >= len(data) * 8 / link.rate_bps + 2 * link.delay_s
        assert proxy.statistics().bytes_up >= len(data)
        nursery.cancel_scope.cancel()


def test_announce_flag_and_its_checks(tmp_path) -> None:
    from peer.cli import build_parser
    from peer.options import config_from_args

    config = config_from_args(build_parser().parse_args([
        "peer", "--data-dir", str(tmp_path), "--train", "t.jsonl",
        "--announce", "/ip4/203.0.113.7/tcp/4001", "--announce", "/ip4/127.0.0.1/tcp/9"]))
    assert config.network.announce == ("/ip4/203.0.113.7/tcp/4001", "/ip4/127.0.0.1/tcp/9")
    with pytest.raises(ValueError, match="leave out /p2p/"):
        NodeConfig(announce=("/ip4/127.0.0.1/tcp/9/p2p/"
                             "12D3KooWGzh5vWxgfEdpHPtvS6BWGKHWmRAZyrcpkUqdrH8kBLkG",))


async def test_announcements_carry_the_proxy_address_and_fetches_use_it() -> None:
    """A peer behind a proxy announces the proxy's address; a peer that joined through that
    address hears it and fetches through the link."""
    from testbed.loopback import LoopbackSwarm

    server: list[GossipNode] = []

    async def target() -> tuple[str, int]:  # the peer listens once it runs, after the proxy
        parts = server[0].listen_addrs[0].split("/")
        return parts[2], int(parts[4])

    async with trio.open_nursery() as nursery:
        proxy = await nursery.start(LinkProxy(Link(delay_s=0.02), target).run)
        swarm = LoopbackSwarm(nursery, NodeConfig(), TopologyConfig(), seed=0)
        behind = await swarm.add(network=NodeConfig(announce=(proxy.multiaddr,)), bootstrap=())
        server.append(behind.node)
        joiner = await swarm.add(bootstrap=(f"{proxy.multiaddr}/p2p/{behind.peer_id}",))
        behind.hold(3)
        joiner.hold(0)
        with trio.fail_after(20):
            await swarm.announce_all()
            await joiner.membership.wait_until(lambda: joiner.membership.latest(
                behind.peer_id) is not None)
        heard = joiner.membership.latest(behind.peer_id)
        assert heard is not None
        assert heard.addrs == (f"{proxy.multiaddr}/p2p/{behind.peer_id}",)
        with trio.fail_after(20):
            assert await joiner.pull_round(1) == 1
        assert joiner.version == 3 and proxy.statistics().bytes_up > 0
        nursery.cancel_scope.cancel()

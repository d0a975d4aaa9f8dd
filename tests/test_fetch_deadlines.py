"""Fetch deadlines that follow the link, on trio's autojump clock over an in-memory stream.

The server writes its adapter at a chosen pace (or stops); `fetch_adapter` runs with the limits
the node gives it (`gossip.fetcher.patience`): a slow link that keeps delivering finishes, a
stalled or trickling one fails in bounded virtual time, with its own reason.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import trio
import trio.testing

from gossip.compress import Codec
from gossip.config import NodeConfig
from gossip.errors import TransferError
from gossip.estimate import PublicEstimate
from gossip.fetcher import Patience, fetch_adapter, link_stats, patience
from gossip.linkstats import LinkStats
from gossip.transfer import AdapterServer, Fetched, Offer, read_frame
from gossip.wire import FetchHeader, digest, frame

SWARM = digest(b"deadlines")[:16]
CONFIG = NodeConfig()  # 30 s setup and floor, 300 s cap, 10 s stall, 32 KiB/s minimum
KIB, MIB = 1 << 10, 1 << 20


class _Stream:
    """A trio memory stream with libp2p's stream methods."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    async def read(self, n: int) -> bytes:
        return bytes(await self.stream.receive_some(n))

    async def write(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def close(self) -> None:
        await self.stream.aclose()


def _adapter(nbytes: int) -> bytes:
    return (bytes(range(256)) * (nbytes // 256 + 1))[:nbytes]


async def _serve(stream: _Stream, data: bytes, *, chunk: int, every_s: float,
                 stop_after: int | None = None) -> None:
    """Answer one request, then send `chunk` bytes every `every_s`, going silent at `stop_after`."""
    await read_frame(stream, max_len=4096)
    await stream.write(frame(FetchHeader(
        swarm=SWARM, status="ok", version=1, samples=4, nbytes=len(data), digest=digest(b"x"),
        body_digest=digest(data), signature=b"s").to_wire()))
    for start in range(0, len(data), chunk):
        if stop_after is not None and start >= stop_after:
            await trio.sleep_forever()
        await trio.sleep(every_s)
        await stream.write(data[start:start + chunk])


async def _exchange(serve: Callable[[_Stream], Awaitable[None]], rules: Patience) -> Fetched:
    """Run `fetch_adapter` against a server running `serve` at the other end of the stream."""
    client, server = trio.testing.memory_stream_pair()
    result: Fetched | TransferError | None = None

    async def serving() -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await serve(_Stream(server))  # until the client hangs up

    async def open_stream() -> _Stream:
        return _Stream(client)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serving)
        try:
            result = await fetch_adapter(open_stream, "peer", SWARM, max_bytes=256 * MIB,
                                         timeout_s=CONFIG.fetch_timeout_s, patience=rules)
        except TransferError as exc:  # raised here, not from inside the nursery's group
            result = exc
        nursery.cancel_scope.cancel()
    if isinstance(result, TransferError):
        raise result
    assert result is not None
    return result


async def _fetch(data: bytes, rules: Patience, **pace: Any) -> Fetched:
    return await _exchange(lambda stream: _serve(stream, data, **pace), rules)


def _rules(links: LinkStats | None = None, peer: str = "peer") -> Patience:
    return patience(CONFIG, links or link_stats(CONFIG), peer)


async def test_a_slow_link_that_keeps_delivering_succeeds(
        autojump_clock: trio.testing.MockClock) -> None:
    # 8 MiB at 128 KiB/s: 64 s, over twice the fixed 30 s that used to be the whole limit.
    data = _adapter(8 * MIB)
    started = trio.current_time()
    fetched = await _fetch(data, _rules(), chunk=64 * KIB, every_s=0.5)
    assert fetched.data == data and trio.current_time() - started == pytest.approx(64, abs=1)
    assert fetched.body_s == pytest.approx(64, abs=1)
    with pytest.raises(TransferError, match="timeout"):  # the fixed rule it replaces
        await _fetch(data, Patience.fixed(CONFIG.fetch_timeout_s), chunk=64 * KIB, every_s=0.5)


async def test_a_stalled_transfer_fails_after_stall_s(
        autojump_clock: trio.testing.MockClock) -> None:
    data = _adapter(4 * MIB)
    started = trio.current_time()
    with pytest.raises(TransferError, match="stalled") as caught:
        await _fetch(data, _rules(), chunk=256 * KIB, every_s=0.5, stop_after=1 * MIB)
    # Four chunks in 2 s, then nothing: it fails `stall_s` after the last byte.
    assert trio.current_time() - started == pytest.approx(2 + CONFIG.stall_s, abs=0.1)
    assert caught.value.reason == "stalled"


async def test_a_trickle_below_the_minimum_rate_fails_when_its_budget_is_spent(
        autojump_clock: trio.testing.MockClock) -> None:
    # 4 KiB/s, often enough never to stall: past its 30 s budget it averages under 32 KiB/s.
    data = _adapter(4 * MIB)
    started = trio.current_time()
    with pytest.raises(TransferError, match="too_slow"):
        await _fetch(data, _rules(), chunk=2 * KIB, every_s=0.5)
    assert trio.current_time() - started == pytest.approx(CONFIG.fetch_timeout_s, abs=0.6)


async def test_nothing_outlasts_the_cap(autojump_clock: trio.testing.MockClock) -> None:
    # 64 KiB/s keeps the minimum average, but 64 MiB would take 1,024 s: the cap ends it.
    data = _adapter(64 * MIB)
    started = trio.current_time()
    with pytest.raises(TransferError, match="timeout"):
        await _fetch(data, _rules(), chunk=32 * KIB, every_s=0.5)
    assert trio.current_time() - started == pytest.approx(CONFIG.max_fetch_s, abs=0.6)


async def test_a_silent_server_fails_the_setup_in_fetch_timeout(
        autojump_clock: trio.testing.MockClock) -> None:
    async def silent(stream: _Stream) -> None:
        await trio.sleep_forever()

    started = trio.current_time()
    with pytest.raises(TransferError, match="timeout"):
        await _exchange(silent, _rules())
    assert trio.current_time() - started == pytest.approx(CONFIG.fetch_timeout_s)


async def test_a_link_measured_slow_earns_a_longer_budget(
        autojump_clock: trio.testing.MockClock) -> None:
    # 1.5 MiB at 16 KiB/s (96 s) averages under the minimum rate: an unknown peer is cut off
    # when its budget (the floor) is spent, a peer measured at that pace gets its time.
    data = _adapter(3 * MIB // 2)
    links = link_stats(CONFIG)
    with pytest.raises(TransferError, match="too_slow"):
        await _fetch(data, _rules(links, "peer"), chunk=8 * KIB, every_s=0.5)
    links.record("peer", MIB, 64.0, 0.1)  # 16 KiB/s
    assert links.deadline_for("peer", len(data)) > 2 * 96
    fetched = await _fetch(data, _rules(links, "peer"), chunk=8 * KIB, every_s=0.5)
    assert fetched.data == data


@pytest.mark.parametrize("nbytes", [1, 64 * KIB, 8 * MIB])
async def test_deadline_grows_with_size_and_the_estimate(nbytes: int) -> None:
    links = link_stats(CONFIG)
    links.record("slow", MIB, 16.0, 0.5)  # 64 KiB/s
    links.record("fast", MIB, 0.1, 0.01)  # 10 MiB/s
    slow, fast = links.deadline_for("slow", nbytes), links.deadline_for("fast", nbytes)
    assert CONFIG.fetch_timeout_s <= fast <= slow <= CONFIG.max_fetch_s
    assert links.deadline_for("slow", 2 * nbytes) >= slow
    if nbytes == 8 * MIB:
        assert slow == pytest.approx(4 * 0.5 + 8 * MIB / (0.5 * 64 * KIB)) and fast == 30.0
    assert math.isfinite(patience(CONFIG, links, "slow").budget(nbytes))



class _Served(_Stream):
    """The server's end, with the remote peer's id where libp2p keeps it."""

    muxed_conn = SimpleNamespace(peer_id="client")


async def test_the_server_waits_for_a_request_no_longer_than_the_fetch_timeout(
        autojump_clock: trio.testing.MockClock) -> None:
    # Uploads may take `max_fetch_s` on a slow link; a stream that asks for nothing may not.
    server = AdapterServer(SWARM, lambda data: b"s", "me", timeout_s=CONFIG.max_fetch_s,
                           request_timeout_s=CONFIG.fetch_timeout_s)
    estimate = PublicEstimate({"m": torch.ones(2, 2)}, Codec("fp32"), version=1).snapshot()
    server.publish(Offer(version=1, samples=4, estimate=estimate))
    _mute, stream = trio.testing.memory_stream_pair()
    started = trio.current_time()
    await server.handle(_Served(stream))
    assert trio.current_time() - started == pytest.approx(CONFIG.fetch_timeout_s)
    assert server.refused == {"timeout": 1}

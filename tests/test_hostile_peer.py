"""A hostile peer on a real libp2p connection: every bad input is refused, logged and counted.

The receiver holds adapter version 0. Every hostile offer is announced as a newer version, so
that, had it been accepted, the receiver would have adopted it: its adapter staying unchanged
is the proof of the rejection, and a final honest offer shows it does adopt good ones.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack
import pytest
import torch
import trio
from libp2p.custom_types import TProtocol

from gossip.config import NodeConfig
from gossip.swarm import PROTOCOL_VERSION, TRANSFER_PROTOCOL
from gossip.transfer import MAX_CONTROL_FRAME, read_frame
from gossip.wire import MAGIC, Announcement, digest, encode_adapter, frame, signed_offer
from testbed.loopback import LOOPBACK_SWARM, SyntheticPeer, loopback_swarm, synthetic_state

_TRANSFER = TProtocol(TRANSFER_PROTOCOL)
MAX_BYTES = 64 * 1024
NETWORK = NodeConfig(max_adapter_bytes=MAX_BYTES, fetch_timeout_s=2.0, min_upload_interval_s=0)
GOOD = encode_adapter(synthetic_state(5))


def _announcement(peer: SyntheticPeer, version: int, data: bytes, **changes: Any) -> Announcement:
    fields: dict[str, Any] = dict(
        swarm=LOOPBACK_SWARM, peer=peer.peer_id, version=version, samples=16,
        digest=digest(data), nbytes=len(data), train_loss=0.5, addrs=tuple(peer.node.listen_addrs),
    )
    fields.update(changes)
    return Announcement(**fields)


def _envelope(kind: str, swarm: bytes = LOOPBACK_SWARM, **fields: Any) -> bytes:
    return MAGIC + swarm + msgpack.packb({"kind": kind, **fields}, use_bin_type=True)


def _raw_announcement(sender: SyntheticPeer, **changes: Any) -> bytes:
    valid = _announcement(sender, 50, GOOD)
    fields = {name: getattr(valid, name) for name in Announcement.FIELDS}
    fields.update(changes)
    return _envelope("announce", **fields)


def _header(signer: SyntheticPeer | None, version: int, data: bytes, **changes: Any) -> bytes:
    """A transfer header, signed by `signer`'s key over its final fields (None: not signed)."""
    fields: dict[str, Any] = dict(protocol=PROTOCOL_VERSION, status="ok", version=version,
                                  samples=16, nbytes=len(data), digest=digest(data))
    fields.update(changes)
    if "signature" not in fields:
        fields["signature"] = bytes(64) if signer is None else _sign(signer, fields)
    return _envelope("fetch_header", **fields)


def _sign(signer: SyntheticPeer, fields: dict[str, Any]) -> bytes:
    try:
        signed = signed_offer(LOOPBACK_SWARM, signer.peer_id, fields["version"],
                              fields["samples"], fields["nbytes"], fields["digest"])
    except (TypeError, ValueError):  # a spoiled field cannot be packed: sign anything
        return bytes(64)
    return bytes(signer.node.host.get_private_key().sign(signed))


def _serving(header: bytes, body: bytes) -> Callable[[Any], Awaitable[None]]:
    """A transfer handler that answers every request with `header` then `body`, then hangs up."""

    async def handle(stream: Any) -> None:
        await read_frame(stream, max_len=MAX_CONTROL_FRAME)
        await stream.write(frame(header))
        if body:
            await stream.write(body)
        await stream.close()

    return handle


async def _silent(stream: Any) -> None:
    await trio.sleep_forever()


def _state(dtype: torch.dtype = torch.float32, fill: float = 0.01,
           tensors: dict[str, torch.Tensor] | None = None) -> bytes:
    """Synthetic adapter bytes, with `tensors` replacing or adding entries."""
    state = {name: t.to(dtype).fill_(fill) for name, t in synthetic_state(1).items()}
    return encode_adapter({**state, **(tensors or {})})


def _pubsub_cases(hostile: SyntheticPeer, other: str) -> list[tuple[str, bytes]]:
    other_swarm = bytes(16)
    return [
        ("bad_magic", b"GET / HTTP/1.1\r\n"),
        ("malformed", MAGIC + LOOPBACK_SWARM + b"\xc1\x00"),
        ("bad_protocol", _raw_announcement(hostile, protocol=99)),
        ("bad_field", _raw_announcement(hostile, samples=10**15)),  # absurd sample count
        ("wrong_swarm", _envelope("announce", swarm=other_swarm, protocol=PROTOCOL_VERSION)),
        ("oversized", MAGIC + LOOPBACK_SWARM + bytes(20_000)),
        ("signer_mismatch", _raw_announcement(hostile, peer=other)),
    ]


async def test_hostile_announcements_are_rejected_before_reaching_the_view(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="gossip")
    async with loopback_swarm(2, network=NETWORK) as swarm:
        receiver, hostile = swarm.peers
        with trio.fail_after(30):
            await swarm.announce_all()
            await receiver.membership.wait_until(lambda: receiver.membership.latest(
                hostile.peer_id) is not None)
            # Its own validator would refuse to send these; a hostile peer has none.
            hostile.node.pubsub.remove_topic_validator(hostile.node.topic)
            expected: Counter[str] = Counter()
            for reason, data in _pubsub_cases(hostile, receiver.peer_id):
                caplog.clear()
                await hostile.node.pubsub.publish(hostile.node.topic, data)
                expected[reason] += 1
                await receiver.membership.wait_until(
                    lambda: receiver.node.rejected[reason] == expected[reason]  # noqa: B023
                )
                assert any(reason in r.getMessage() for r in caplog.records), reason
            assert receiver.node.rejected == expected
            latest = receiver.membership.latest(hostile.peer_id)
            assert latest is not None and latest.version == 0, "nothing hostile reached the view"
            # The receiver keeps running: a valid announcement still gets through.
            hostile.hold(1)
            await hostile.announce()
            await receiver.membership.wait_until(
                lambda: getattr(receiver.membership.latest(hostile.peer_id), "version", 0) == 1
            )
        assert receiver.version == 0


Served = bytes | Callable[[Any], Awaitable[None]]


def _transfer_cases(hostile: SyntheticPeer,
                    oversized: bytes) -> list[tuple[str, Callable[[int], Served]]]:
    """(reason, version -> what the hostile peer serves: adapter bytes or a stream handler).

    Served bytes are announced with their own digest; a handler is announced as serving GOOD.
    """
    short = GOOD[: len(GOOD) // 2]
    h = hostile
    return [
        ("shape_mismatch", lambda v: _state(tensors={"layer.lora_A.weight": torch.zeros(4, 33)})),
        ("dtype_mismatch", lambda v: _state(dtype=torch.float16)),
        ("keys_mismatch", lambda v: _state(tensors={"extra": torch.zeros(2)})),
        ("non_finite", lambda v: _state(fill=float("nan"))),
        ("non_finite", lambda v: _state(fill=float("inf"))),
        ("truncated", lambda v: GOOD[:20]),  # a safetensors header cut short
        ("bad_tensor", lambda v: GOOD[:-8]),  # a body shorter than its header says
        ("oversized", lambda v: _serving(_header(h, v, oversized), oversized)),
        ("truncated", lambda v: _serving(_header(h, v, GOOD), short)),  # the stream ends early
        ("bad_field", lambda v: _serving(_header(h, v, GOOD, samples=10**15), GOOD)),  # absurd
        ("header_mismatch", lambda v: _serving(_header(h, v, GOOD, samples=10**9), GOOD)),
        ("bad_protocol", lambda v: _serving(_header(h, v, GOOD, protocol=7), GOOD)),
        ("malformed", lambda v: _serving(MAGIC + LOOPBACK_SWARM + b"\x92\xc1", GOOD)),
        ("digest_mismatch", lambda v: _serving(_header(h, v, GOOD), GOOD[:-1] + b"!")),
        ("timeout", lambda v: _silent),
        # The header must carry the server's own signature over what it serves.
        ("bad_signature", lambda v: _serving(_header(None, v, GOOD), GOOD)),
        ("bad_signature", lambda v: _serving(_header(h, v, GOOD, signature=_sign(
            h, {"version": v + 1, "samples": 16, "nbytes": len(GOOD), "digest": digest(GOOD)})),
            GOOD)),  # signed for another version
        # A version lie: signed, but behind what it announced (a rollback), or the announced
        # version with other bytes (each client may be shown another adapter).
        ("header_mismatch", lambda v: _serving(_header(h, v - 1, GOOD), GOOD)),
        ("equivocation", lambda v: _serving(_header(h, v, _state()), _state())),
    ]


async def test_hostile_adapters_are_rejected_and_never_adopted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="gossip")
    oversized = encode_adapter({"layer.lora_A.weight": torch.zeros(4, 32 * 1024)})
    assert len(oversized) > MAX_BYTES
    async with loopback_swarm(2, network=NETWORK) as swarm:
        receiver, hostile = swarm.peers
        before = receiver.node.server.current
        with trio.fail_after(60):
            await swarm.announce_all()
            expected: Counter[str] = Counter()
            for version, (reason, make) in enumerate(_transfer_cases(hostile, oversized), 1):
                caplog.clear()
                served = make(version)
                announced = served if isinstance(served, bytes) else GOOD
                if isinstance(served, bytes):
                    hostile.hold(version, served)
                else:
                    hostile.node.host.set_stream_handler(_TRANSFER, served)
                await hostile.node.publish(_announcement(hostile, version, announced))
                await receiver.membership.wait_until(
                    lambda: getattr(receiver.membership.latest(hostile.peer_id), "version", 0)
                    == version  # noqa: B023
                )
                started = trio.current_time()
                assert await receiver.pull_round(1) == 0, reason
                assert trio.current_time() - started < NETWORK.fetch_timeout_s + 3  # loaded CI
                expected[reason] += 1
                # Each counted once, by its owner: the node the format, validation the rest.
                assert receiver.node.rejected + receiver.rejected == expected, reason
                assert any(reason in r.getMessage() for r in caplog.records), reason
                assert receiver.version == 0 and receiver.node.server.current == before, reason
                hostile.node.host.set_stream_handler(_TRANSFER, hostile.node.server.handle)
            # The control: an honest newer adapter is fetched and adopted.
            hostile.hold(99, GOOD)
            await hostile.node.publish(_announcement(hostile, 99, GOOD))
            await receiver.membership.wait_until(
                lambda: getattr(receiver.membership.latest(hostile.peer_id), "version", 0) == 99
            )
            assert await receiver.pull_round(1) == 1
        assert receiver.version == 99 and receiver.node.server.current != before

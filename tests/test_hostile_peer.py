"""A hostile peer on a real libp2p connection: every bad input is refused, logged and counted.

The receiver holds adapter version 0. Every hostile offer is announced as a newer version, so
that, had it been accepted, the receiver would have adopted it: its adapter staying unchanged
is the proof of the rejection, and a final honest offer shows it does adopt good ones. A
hostile server's bodies are estimate updates (`gossip.estimate.encode_update`): keyframes and
deltas, well formed or not, under headers signed or not.
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

from gossip.compress import Codec
from gossip.config import NodeConfig
from gossip.estimate import NO_DIGEST, UPDATE_MAGIC, EstimateStep, encode_update, estimate_digest
from gossip.swarm import PROTOCOL_VERSION, TRANSFER_PROTOCOL
from gossip.transfer import MAX_CONTROL_FRAME, read_frame
from gossip.wire import MAGIC, Announcement, digest, frame, signed_offer
from testbed.loopback import LOOPBACK_SWARM, SyntheticPeer, loopback_swarm, synthetic_state

_TRANSFER = TProtocol(TRANSFER_PROTOCOL)
MAX_BYTES = 64 * 1024
NETWORK = NodeConfig(max_adapter_bytes=MAX_BYTES, fetch_timeout_s=2.0, min_upload_interval_s=0)
GOOD_STATE = synthetic_state(5)
GOOD = estimate_digest(GOOD_STATE)  # the digest that names the honest estimate


def _announcement(peer: SyntheticPeer, version: int, target: bytes = GOOD,
                  **changes: Any) -> Announcement:
    fields: dict[str, Any] = dict(
        swarm=LOOPBACK_SWARM, peer=peer.peer_id, version=version, samples=16,
        digest=target, nbytes=4096, train_loss=0.5, addrs=tuple(peer.node.listen_addrs),
    )
    fields.update(changes)
    return Announcement(**fields)


def _envelope(kind: str, swarm: bytes = LOOPBACK_SWARM, **fields: Any) -> bytes:
    return MAGIC + swarm + msgpack.packb({"kind": kind, **fields}, use_bin_type=True)


def _raw_announcement(sender: SyntheticPeer, **changes: Any) -> bytes:
    valid = _announcement(sender, 50)
    fields = {name: getattr(valid, name) for name in Announcement.FIELDS}
    fields.update(changes)
    return _envelope("announce", **fields)


def _header(signer: SyntheticPeer | None, version: int, body: bytes, target: bytes = GOOD,
            **changes: Any) -> bytes:
    """A transfer header for `body` leading to `target`, signed by `signer`'s key over its final
    fields (None: not signed)."""
    fields: dict[str, Any] = dict(protocol=PROTOCOL_VERSION, status="ok", version=version,
                                  samples=16, nbytes=len(body), digest=target,
                                  body_digest=digest(body), privacy=-1.0)
    fields.update(changes)
    if "signature" not in fields:
        fields["signature"] = bytes(64) if signer is None else _sign(signer, fields)
    return _envelope("fetch_header", **fields)


def _sign(signer: SyntheticPeer, fields: dict[str, Any]) -> bytes:
    try:
        signed = signed_offer(LOOPBACK_SWARM, signer.peer_id, fields["version"],
                              fields["samples"], fields["nbytes"], fields["digest"],
                              fields["body_digest"], fields.get("privacy", -1.0))
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


def _state(fill: float = 0.01, tensors: dict[str, torch.Tensor] | None = None,
           ) -> dict[str, torch.Tensor]:
    """A synthetic adapter, with `tensors` replacing or adding entries."""
    state = {name: t.fill_(fill) for name, t in synthetic_state(1).items()}
    return {**state, **(tensors or {})}


def _payload(state: dict[str, torch.Tensor]) -> bytes:
    return Codec("fp32").encode(state)


def _update(version: int, payload: bytes, target: bytes = GOOD,
            base: tuple[int, bytes] = (-1, NO_DIGEST)) -> bytes:
    """Update bytes of one step (a keyframe unless `base` is given) claimed to lead to `target`."""
    return encode_update((EstimateStep(*base, version, target, payload),))


def _good(version: int) -> bytes:
    return _update(version, _payload(GOOD_STATE))


def _keyframe(signer: SyntheticPeer, version: int, state: dict[str, torch.Tensor], *,
              payload: bytes | None = None) -> Served:
    """A signed keyframe of `state` (or of `payload`, claimed to rebuild `state`)."""
    target = estimate_digest(state)
    body = _update(version, payload if payload is not None else _payload(state), target)
    return _serving(_header(signer, version, body, target), body)


def _spoiled(payload: bytes, old: bytes, new: bytes) -> bytes:
    """`payload` with the first `old` after its header replaced by `new` (a body value)."""
    at = payload.index(old, len(payload) - 4 * 64)
    return payload[:at] + new + payload[at + len(old):]


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
        # Self-reported figures are bounded like every field: a terminal escape as the device.
        ("bad_telemetry", _raw_announcement(hostile, telemetry={
            "round": 3, "eval_loss": None, "device": "cpu\x1b[2J", "rank": 8,
            "merge_rule": "average"})),
        ("bad_telemetry", _raw_announcement(hostile, telemetry={"round": -1})),
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


Served = Callable[[Any], Awaitable[None]]
Case = Callable[[int], tuple[Served, bytes]]


def _transfer_cases(hostile: SyntheticPeer) -> list[tuple[str, Case]]:
    """(reason, version -> the hostile peer's transfer handler and the digest it announces)."""
    h = hostile
    one = _payload(_state(fill=1.0))
    nan, inf, fp32_one = b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f", b"\x00\x00\x80\x3f"
    unheld = (1, digest(b"an estimate the receiver never held"))
    oversized = b"x" * (MAX_BYTES + 1)

    def bad(version: int, body: bytes) -> tuple[Served, bytes]:  # signed, over whatever body
        return _serving(_header(h, version, body), body), GOOD

    def keyframe(version: int, state: dict[str, torch.Tensor]) -> tuple[Served, bytes]:
        return _keyframe(h, version, state), estimate_digest(state)

    def good(header: bytes, body: bytes) -> tuple[Served, bytes]:
        return _serving(header, body), GOOD

    return [
        # Well signed and framed, but not an adapter of our swarm (merge.validate says so).
        ("shape_mismatch", lambda v: keyframe(
            v, _state(tensors={"layer.lora_A.weight": torch.zeros(4, 33)}))),
        ("keys_mismatch", lambda v: keyframe(v, _state(tensors={"extra": torch.zeros(1, 2)}))),
        # Bodies that do not decode: garbage, a broken update, broken payloads.
        ("bad_magic", lambda v: bad(v, b"GET / HTTP/1.1\r\n" * 4)),
        ("malformed", lambda v: bad(v, UPDATE_MAGIC + b"\xc1")),
        ("truncated", lambda v: bad(v, _update(v, _payload(GOOD_STATE)[:20]))),
        ("bad_codec", lambda v: bad(v, _update(v, _payload(GOOD_STATE).replace(
            b"fp32", b"fp64", 1)))),
        ("non_finite", lambda v: bad(v, _update(v, _spoiled(one, fp32_one, nan)))),
        ("non_finite", lambda v: bad(v, _update(v, _spoiled(one, fp32_one, inf)))),
        # A keyframe that does not rebuild the estimate it is signed for.
        ("estimate_mismatch", lambda v: bad(v, _update(v, one))),
        # A delta against a base the receiver does not hold.
        ("wrong_base", lambda v: bad(v, _update(v, _payload(GOOD_STATE), base=unheld))),
        ("oversized", lambda v: good(_header(h, v, oversized), oversized)),
        ("truncated", lambda v: good(_header(h, v, _good(v)), _good(v)[:40])),  # ends early
        ("bad_field", lambda v: good(_header(h, v, _good(v), samples=10**15), _good(v))),
        ("header_mismatch", lambda v: good(_header(h, v, _good(v), samples=10**9), _good(v))),
        ("bad_protocol", lambda v: good(_header(h, v, _good(v), protocol=7), _good(v))),
        ("malformed", lambda v: good(MAGIC + LOOPBACK_SWARM + b"\x92\xc1", _good(v))),
        ("digest_mismatch", lambda v: good(_header(h, v, _good(v)), _good(v)[:-1] + b"!")),
        ("timeout", lambda v: (_silent, GOOD)),
        # The header must carry the server's own signature over what it serves.
        ("bad_signature", lambda v: good(_header(None, v, _good(v)), _good(v))),
        ("bad_signature", lambda v: good(_header(h, v, _good(v), signature=_sign(
            h, {"version": v + 1, "samples": 16, "nbytes": len(_good(v)), "digest": GOOD,
                "body_digest": digest(_good(v))})), _good(v))),  # signed for another version
        ("bad_signature", lambda v: good(_header(h, v, _good(v), privacy=4.0, signature=_sign(
            h, {"version": v, "samples": 16, "nbytes": len(_good(v)), "digest": GOOD,
                "body_digest": digest(_good(v)), "privacy": 9.0})), _good(v))),  # ε lowered
        # A version lie: signed, but behind what it announced (a rollback), or the announced
        # version with another estimate (each client may be shown another adapter).
        ("header_mismatch", lambda v: good(_header(h, v - 1, _good(v - 1)), _good(v - 1))),
        ("equivocation", lambda v: (_keyframe(h, v, _state()), GOOD)),
    ]


async def test_hostile_adapters_are_rejected_and_never_adopted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="gossip")
    async with loopback_swarm(2, network=NETWORK) as swarm:
        receiver, hostile = swarm.peers
        before = receiver.node.server.current
        with trio.fail_after(60):
            await swarm.announce_all()
            expected: Counter[str] = Counter()
            for version, (reason, make) in enumerate(_transfer_cases(hostile), 1):
                caplog.clear()
                served, announced = make(version)
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
            hostile.hold(99, GOOD_STATE)
            await hostile.node.publish(_announcement(hostile, 99))
            await receiver.membership.wait_until(
                lambda: getattr(receiver.membership.latest(hostile.peer_id), "version", 0) == 99
            )
            assert await receiver.pull_round(1) == 1
        assert receiver.version == 99 and receiver.node.server.current != before

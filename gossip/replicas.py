"""What a peer holds of its neighbours' public estimates: one `EstimateReplica` each, bounded.

A fetch asks a neighbour for the steps since the version of its estimate we hold
(`Replicas.held`); `Replicas.apply` (in a worker thread) decodes the update, checks that it
leads to the version and digest the server signed, and applies it all or nothing. A rejected
update drops the replica, so that the next fetch asks for a keyframe. Replicas are dropped when
their peer leaves the membership view (`forget`) and, past `max_replicas`, least recently used
first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import trio

from gossip.compress import Codec, Shapes, decode_payload, payload_shapes
from gossip.errors import WireError
from gossip.estimate import (
    MAX_CHAIN,
    EstimateStep,
    State,
    check_chain,
    copy_state,
    decode_update,
    estimate_digest,
)
from gossip.transfer import Fetched

__all__ = ["MAX_REPLICAS", "EstimateReplica", "ReplicaStatistics", "Replicas", "max_update_bytes"]

# Neighbours whose estimate we keep (each an adapter's size): more than a view's fetch partners.
MAX_REPLICAS = 64
# What framing an update adds to its payloads: per step a msgpack row (two digests, two versions)
# under 128 bytes, a chain at most MAX_CHAIN steps; per payload its header (names and shapes).
_STEP_FRAMING = 128
_HEADER_SLACK = 1024


def max_update_bytes(shapes: Shapes, *, rank_factor: int = 1) -> int:
    """The largest update a neighbour with tensors of `shapes` (each up to `rank_factor` times
    as large, when ranks may differ) can send. A server sends a chain of steps only when its
    payloads are smaller than the keyframe's, so the bound is a float32 keyframe (zstd's
    worst-case expansion of incompressible bytes is under 1/128 of them) plus framing."""
    body = rank_factor * Codec("fp32").body_size(shapes)
    header = sum(len(name) + 16 for name in shapes) + _HEADER_SLACK
    return body + body // 64 + header + MAX_CHAIN * _STEP_FRAMING


@dataclass
class ReplicaStatistics:
    """Counters of an `EstimateReplica`: updates applied, and rejections by reason."""

    keyframes: int = 0
    chains: int = 0
    steps: int = 0
    rejected: dict[str, int] = field(default_factory=dict)


class EstimateReplica:
    """The receiver's side: a neighbour's x̂, rebuilt from its keyframes and steps.

    Args:
        shapes: our own adapter's {name: (rows, cols)}; a payload of other tensors is refused.
        max_payload_bytes: the cap on one step's payload.
    """

    def __init__(self, shapes: Shapes, *, max_payload_bytes: int) -> None:
        self._shapes = dict(shapes)
        self._max_payload_bytes = max_payload_bytes
        self._state: State | None = None
        self._target: tuple[int, bytes] | None = None
        self._want_keyframe = True
        self.stats = ReplicaStatistics()

    @property
    def estimate(self) -> State | None:
        """A copy of the last estimate rebuilt and verified, or None before the first keyframe."""
        return None if self._state is None else copy_state(self._state)

    @property
    def version(self) -> tuple[int, bytes] | None:
        """(version, digest) of `estimate`, or None."""
        return self._target

    def start_at(self, version: tuple[int, bytes], state: State) -> None:
        """Hold `state` (not copied: it is never changed in place) as the estimate at
        `version`, with no update applied yet: where chains from a shared origin begin."""
        self._state, self._target, self._want_keyframe = state, version, False

    def held(self) -> tuple[int, bytes] | None:
        """What to tell the server we hold: None (send a keyframe) after a rejection."""
        return None if self._want_keyframe else self._target

    def apply(self, steps: Sequence[EstimateStep]) -> None:
        """Apply a keyframe or a chain of steps, all or nothing; () is "up to date".

        1. The chain must link and start at a keyframe or at the version we hold ("wrong_base").
        2. Each payload is decoded against our shapes (any codec) and added, in float32.
        3. The result must have the digest of the last step's target ("estimate_mismatch").

        Raises:
            WireError: the update is rejected and counted; the estimate stays as it was and
                `held()` returns None until a keyframe is applied.
        """
        if not steps:
            return
        try:
            state = self._rebuild(steps)
        except WireError as exc:
            self._want_keyframe = True
            self.stats.rejected[exc.reason] = self.stats.rejected.get(exc.reason, 0) + 1
            raise
        self._state, self._target, self._want_keyframe = state, steps[-1].target, False
        if steps[0].is_keyframe:
            self.stats.keyframes += 1
        else:
            self.stats.chains += 1
        self.stats.steps += len(steps)

    def _rebuild(self, steps: Sequence[EstimateStep]) -> State:
        check_chain(steps, max_steps=len(steps))
        first = steps[0]
        if not first.is_keyframe and (self._state is None or first.base != self._target):
            raise WireError("wrong_base", f"a delta from version {first.base_version}, we hold "
                            f"{self._target[0] if self._target else 'nothing'}")
        state: State = {}
        for step in steps:
            _, moved = decode_payload(step.payload, shapes=self._shapes,
                                      max_bytes=self._max_payload_bytes)
            if step.is_keyframe:
                state = moved
            else:
                base = state or self._state or {}
                state = {name: base[name] + moved[name] for name in moved}
        if estimate_digest(state) != steps[-1].digest:
            raise WireError("estimate_mismatch",
                            f"version {steps[-1].version} does not rebuild its digest")
        return state


class Replicas:
    """Per neighbour, the estimate rebuilt from its updates.

    Args:
        cap_bytes: the largest update taken whatever our shapes (`--max-adapter-bytes`).
        max_replicas: the most neighbours whose estimate is kept.
    """

    def __init__(self, *, cap_bytes: int, max_replicas: int = MAX_REPLICAS) -> None:
        self._cap_bytes = cap_bytes
        self._max_replicas = max_replicas
        self._held: OrderedDict[str, EstimateReplica] = OrderedDict()  # least recent first
        self._receiving: dict[str, trio.Lock] = {}  # peers with an update being received
        self.totals = ReplicaStatistics()  # over every replica, dropped ones included
        self._origin: tuple[tuple[int, bytes], State] | None = None  # (version 0, digest), x̂
        # Our adapter's shapes and how much larger a neighbour's tensors may be (ranks that
        # differ); None: any a keyframe declares, up to the cap.
        self.shapes: dict[str, tuple[int, int]] | None = None
        self.rank_factor = 1

    def __len__(self) -> int:
        return len(self._held)

    def expect(self, shapes: Shapes, *, rank_factor: int = 1,
               origin: Mapping[str, torch.Tensor] | None = None) -> None:
        """Our adapter's shapes: what a neighbour's keyframe must declare (each tensor up to
        `rank_factor` times as large) and what bounds an update's size; and `origin`, the
        estimate every neighbour's starts from (version 0: the swarm-seeded adapter), if any."""
        shapes = dict(shapes)
        if shapes != self.shapes or rank_factor != self.rank_factor:
            self._held.clear()
        self.shapes, self.rank_factor = shapes, rank_factor
        if origin is None:
            self._origin = None
        elif self._origin is None:  # set once: digesting an adapter each round costs
            state = copy_state({name: t.detach().float().cpu() for name, t in origin.items()})
            self._origin = (0, estimate_digest(state)), state

    def held(self, peer: str) -> tuple[int, bytes] | None:
        """What to tell `peer` we hold of its estimate: our replica's version, else the
        origin's, else nothing (a keyframe)."""
        replica = self._held.get(peer)
        if replica is not None:
            return replica.held()
        return None if self._origin is None else self._origin[0]

    @property
    def max_update_bytes(self) -> int:
        """The largest update body taken from a neighbour (`max_update_bytes` of our shapes)."""
        if self.shapes is None:
            return self._cap_bytes
        return min(self._cap_bytes, max_update_bytes(self.shapes, rank_factor=self.rank_factor))

    @property
    def bound(self) -> int | None:
        """The size check a transfer header must pass; None (any up to the cap) before
        our shapes are known."""
        return None if self.shapes is None else self.max_update_bytes

    @asynccontextmanager
    async def receiving(self, peer: str) -> AsyncIterator[None]:
        """Hold `peer`'s replica for one fetch-and-apply: two at once would both ask for the
        steps since the same version, and the second chain, based on a version the first one
        replaced, would be refused as "wrong_base" and cost a keyframe."""
        lock = self._receiving.setdefault(peer, trio.Lock())
        async with lock:
            try:
                yield
            finally:
                if not lock.statistics().tasks_waiting:
                    self._receiving.pop(peer, None)

    def statistics(self) -> dict[str, Any]:
        """For status.json: replicas held, and the updates applied since the start (their
        rejections are the node's to count, with every other one)."""
        totals = asdict(self.totals)
        del totals["rejected"]
        return {"held": len(self._held), **totals}

    def get(self, peer: str) -> EstimateReplica | None:
        """`peer`'s replica, or None (the next fetch from it asks for a keyframe)."""
        return self._held.get(peer)

    def forget(self, peer: str) -> None:
        """Drop `peer`'s replica: it left the view, or its last update was rejected."""
        self._held.pop(peer, None)

    def refuse(self, peer: str) -> None:
        """`peer`'s last update was rejected: drop what we hold of its estimate and ask it for
        a keyframe next (not a chain from the origin, which may be what went wrong)."""
        self.forget(peer)
        if self.shapes is not None:
            self.keep(peer, EstimateReplica(self.shapes, max_payload_bytes=self.max_update_bytes))

    def keep(self, peer: str, replica: EstimateReplica) -> None:
        """Hold `replica` for `peer` as its most recent one; drop the least recent past the cap."""
        self._held[peer] = replica
        self._held.move_to_end(peer)
        while len(self._held) > self._max_replicas:
            self._held.popitem(last=False)

    def apply(self, replica: EstimateReplica | None,
              fetched: Fetched) -> tuple[EstimateReplica, dict[str, torch.Tensor]]:
        """Decode and apply an update (call in a worker thread); returns the replica and x̂.

        1. Decode the update and check that it leads to the signed (version, digest); with no
           replica of this peer's yet, from the origin when there is one.
        2. A keyframe starts a fresh replica (of our shapes, or those it declares when ranks
           may differ); a delta needs the replica it is based on ("wrong_base").
        3. `EstimateReplica.apply` decodes every payload and checks the digest rebuilt.

        Raises:
            WireError: with the reason of the rejection.
        """
        bound = self.max_update_bytes
        steps = decode_update(fetched.data, max_bytes=bound)
        if replica is None and self._origin is not None:  # we asked from the origin (`held`)
            assert self.shapes is not None  # set with the origin
            replica = EstimateReplica(self.shapes, max_payload_bytes=bound)
            replica.start_at(*self._origin)
        leads_to = steps[-1].target if steps else replica.version if replica else None
        if leads_to != (fetched.version, fetched.digest):
            raise WireError("estimate_mismatch", f"the update does not lead to the signed "
                            f"version {fetched.version}")
        if steps and steps[0].is_keyframe:  # a keyframe replaces all: a fresh replica
            replica = EstimateReplica(self._keyframe_shapes(steps[0].payload, bound),
                                      max_payload_bytes=bound)
        if replica is None:
            raise WireError("wrong_base", "a delta, and we hold none of this peer's estimate")
        replica.apply(steps)
        self._count(steps)
        state = replica.estimate
        assert state is not None  # applied, or up to date with a version held
        return replica, state

    def _count(self, steps: Sequence[EstimateStep]) -> None:
        if steps:
            kind = "keyframes" if steps[0].is_keyframe else "chains"
            setattr(self.totals, kind, getattr(self.totals, kind) + 1)
            self.totals.steps += len(steps)

    def _keyframe_shapes(self, payload: bytes, bound: int) -> Shapes:
        """Our shapes, or (ranks that differ, or none known) those the keyframe declares, each
        tensor within `rank_factor` of ours and all within the update bound."""
        ours = self.shapes
        if ours is not None and self.rank_factor == 1:
            return ours
        theirs = payload_shapes(payload, max_elements=bound // 4)
        if ours is not None and (theirs.keys() != ours.keys() or any(
                r * c > self.rank_factor * ours[n][0] * ours[n][1]
                for n, (r, c) in theirs.items())):
            raise WireError("bad_codec", "a keyframe of other tensors, or too large ones")
        return theirs

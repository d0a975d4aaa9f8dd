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

import torch

from gossip.compress import Codec, Shapes, payload_shapes
from gossip.errors import WireError
from gossip.estimate import MAX_CHAIN, EstimateReplica, decode_update
from gossip.transfer import Fetched

__all__ = ["MAX_REPLICAS", "Replicas", "max_update_bytes"]

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
        # Our adapter's shapes and how much larger a neighbour's tensors may be (ranks that
        # differ); None: any a keyframe declares, up to the cap.
        self.shapes: dict[str, tuple[int, int]] | None = None
        self.rank_factor = 1

    def __len__(self) -> int:
        return len(self._held)

    def expect(self, shapes: Shapes, *, rank_factor: int = 1) -> None:
        """Our adapter's shapes: what a neighbour's keyframe must declare (each tensor up to
        `rank_factor` times as large) and what bounds an update's size."""
        shapes = dict(shapes)
        if shapes != self.shapes or rank_factor != self.rank_factor:
            self._held.clear()
        self.shapes, self.rank_factor = shapes, rank_factor

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

    def get(self, peer: str) -> EstimateReplica | None:
        """`peer`'s replica, or None (the next fetch from it asks for a keyframe)."""
        return self._held.get(peer)

    def forget(self, peer: str) -> None:
        """Drop `peer`'s replica: it left the view, or its last update was rejected."""
        self._held.pop(peer, None)

    def keep(self, peer: str, replica: EstimateReplica) -> None:
        """Hold `replica` for `peer` as its most recent one; drop the least recent past the cap."""
        self._held[peer] = replica
        self._held.move_to_end(peer)
        while len(self._held) > self._max_replicas:
            self._held.popitem(last=False)

    def apply(self, replica: EstimateReplica | None,
              fetched: Fetched) -> tuple[EstimateReplica, dict[str, torch.Tensor]]:
        """Decode and apply an update (call in a worker thread); returns the replica and x̂.

        1. Decode the update and check that it leads to the signed (version, digest).
        2. A keyframe starts a fresh replica (of our shapes, or those it declares when ranks
           may differ); a delta needs the replica it is based on ("wrong_base").
        3. `EstimateReplica.apply` decodes every payload and checks the digest rebuilt.

        Raises:
            WireError: with the reason of the rejection.
        """
        bound = self.max_update_bytes
        steps = decode_update(fetched.data, max_bytes=bound)
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
        state = replica.estimate
        assert state is not None  # applied, or up to date with a version held
        return replica, state

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

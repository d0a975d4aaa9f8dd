"""Swarms of synthetic peers on loopback, for tests and benchmarks of the network layer.

Every peer is a real `GossipNode` (libp2p host on 127.0.0.1, port 0) with a real `Membership`;
only the adapter is a stand-in: a tiny LoRA-shaped state whose values encode its version. No
language model is loaded, so 32 peers fit in one process on two cores.

A "pull round" is the network half of a daemon round: fetch from `fanout` random live
neighbours and adopt whatever is newer than what we hold.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import trio
from libp2p import generate_new_ed25519_identity
from libp2p.peer.id import ID
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.validators import PUBSUB_SIGNING_PREFIX

from gossip.config import NodeConfig
from gossip.errors import TransferError, WireError
from gossip.membership import Membership
from gossip.node import GossipNode, Received
from gossip.swarm import swarm_id
from gossip.wire import Announcement, digest, encode_adapter
from merge.errors import RejectedUpdate
from merge.validate import check_structure
from topology.config import TopologyConfig

logger = logging.getLogger(__name__)

LOOPBACK_SWARM = swarm_id("loopback-synthetic-model", {"r": 4, "alpha": 8}, 0)
_SHAPES = {"layer.lora_A.weight": (4, 32), "layer.lora_B.weight": (32, 4)}
_ANNOUNCE_GAP_S = 0.02  # gossipsub drops bursts (PY-LIBP2P.md pitfall 4)


def synthetic_state(version: int, *, scale: float = 1e-3) -> dict[str, torch.Tensor]:
    """A LoRA-shaped adapter whose every value is `version * scale` (so versions differ)."""
    return {name: torch.full(shape, version * scale) for name, shape in _SHAPES.items()}


@dataclass
class SyntheticPeer:
    """One loopback peer: node, membership, the adapter version it serves."""

    node: GossipNode
    membership: Membership
    version: int = -1
    samples: int = 0
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    stopped: trio.Event = field(default_factory=trio.Event)
    rejected: Counter[str] = field(default_factory=Counter)  # by validation, as a daemon counts

    @property
    def peer_id(self) -> str:
        return self.node.peer_id

    def has_topic_peer(self) -> bool:
        """Whether a connected peer has subscribed to the swarm topic (publishes can leave)."""
        return bool(self.node.topic_peers())

    def hold(self, version: int, state: Mapping[str, torch.Tensor] | None = None,
             samples: int = 16) -> None:
        """Serve adapter `version` from now on (a synthetic one unless `state` is given)."""
        self.node.offer(version, samples, state if state is not None else synthetic_state(version))
        self.version, self.samples = version, samples

    async def announce(self) -> None:
        """Publish the held version (call `hold` first)."""
        offer = self.node.server.current
        if offer is None:
            raise RuntimeError("hold an adapter before announcing it")
        await self.node.publish(Announcement(
            swarm=self.node.swarm, peer=self.peer_id, version=offer.version,
            samples=offer.samples, digest=offer.digest, nbytes=offer.keyframe_bytes, train_loss=1.0,
            addrs=tuple(self.node.announce_addrs),
        ))

    async def pull_round(self, fanout: int) -> int:
        """Fetch from `fanout` random live neighbours; adopt the newest newer version.

        Returns:
            How many fetches succeeded with an adapter of the synthetic structure.
        """
        received: list[Received] = []

        async def pull(announcement: Announcement) -> None:
            # A failed neighbour is skipped; the node has counted and logged why.
            with contextlib.suppress(TransferError, WireError):
                got = await self.node.receive(announcement)
                if self._fits(got):
                    received.append(got)

        async with trio.open_nursery() as nursery:
            for announcement in self.membership.sample(fanout):
                nursery.start_soon(pull, announcement)
        newest = max(received, key=lambda r: r.version, default=None)
        if newest is not None and newest.version > self.version:
            self.hold(newest.version, newest.state, newest.samples)
        return len(received)

    def _fits(self, adapter: Received) -> bool:
        """Whether `adapter` has our keys, shapes and dtypes, as a daemon's validation asks.

        Structure only: synthetic values encode versions, so their norms mean nothing.
        """
        try:
            check_structure(synthetic_state(0), adapter.state)
        except RejectedUpdate as exc:
            self.rejected[exc.reason] += 1
            logger.warning("rejected adapter from %s: %s", adapter.peer, exc)
            return False
        return True

    def stop(self) -> None:
        """Stop abruptly: cancel every task of this peer; its sockets close, no goodbye is said.

        `stopped` is set once the host has closed.
        """
        self.scope.cancel()


class LoopbackSwarm:
    """Peers started in one nursery; the first is every later peer's bootstrap."""

    def __init__(self, nursery: trio.Nursery, network: NodeConfig, topology: TopologyConfig,
                 seed: int) -> None:
        self._nursery = nursery
        self._network = network
        self._topology = topology
        self._rng = random.Random(seed)
        self.peers: list[SyntheticPeer] = []

    async def add(self, *, bootstrap: tuple[str, ...] | None = None,
                  network: NodeConfig | None = None) -> SyntheticPeer:
        """Start one more peer; by default it bootstraps through the first peer."""
        if bootstrap is None:
            bootstrap = (self.peers[0].node.listen_addrs[0],) if self.peers else ()
        config = replace(network or self._network, bootstrap=bootstrap)
        node = GossipNode(config, LOOPBACK_SWARM, identity_dir=None)
        rng = random.Random(self._rng.getrandbits(64))
        peer = SyntheticPeer(node, Membership(node, self._topology, rng))
        await self._nursery.start(self._run, peer)
        self.peers.append(peer)
        return peer

    @staticmethod
    async def _run(peer: SyntheticPeer, *, task_status: Any) -> None:
        try:
            with peer.scope:
                async with trio.open_nursery() as nursery:
                    await nursery.start(peer.node.run)
                    await nursery.start(peer.membership.run)
                    task_status.started()
        finally:
            peer.stopped.set()

    def running(self) -> list[SyntheticPeer]:
        """Peers not stopped."""
        return [peer for peer in self.peers if not peer.scope.cancel_called]

    async def announce_all(self) -> None:
        """Every running peer publishes its held version, paced, once it has a topic peer."""
        for peer in self.running():
            await peer.membership.wait_until(peer.has_topic_peer)
            await peer.announce()
            await trio.sleep(_ANNOUNCE_GAP_S)

    async def pull_round(self, fanout: int) -> None:
        """One synchronous round: every running peer pulls at once; returns when all did."""
        async with trio.open_nursery() as nursery:
            for peer in self.running():
                nursery.start_soon(peer.pull_round, fanout)


@contextlib.asynccontextmanager
async def loopback_swarm(
    size: int,
    *,
    network: NodeConfig | None = None,
    topology: TopologyConfig | None = None,
    seed: int = 0,
) -> AsyncIterator[LoopbackSwarm]:
    """Start `size` synthetic peers (peer 0 is the bootstrap), each holding version 0.

    Peers are not announced yet: call `announce_all` when the test or benchmark wants them
    known. Everything is cancelled and every host closed on exit.
    """
    async with trio.open_nursery() as nursery:
        swarm = LoopbackSwarm(nursery, network or NodeConfig(), topology or TopologyConfig(),
                              seed)
        for _ in range(size):
            peer = await swarm.add()
            peer.hold(0)
        yield swarm
        nursery.cancel_scope.cancel()


class SybilPublisher:
    """An attacker's host that publishes announcements signed by identities it mints at will.

    Identities are free: each announcement here comes from a fresh Ed25519 key, correctly
    signed (gossipsub strict signing verifies), so every honest peer's validator passes it and
    forwards it. Its adapters are never served: the addresses point at the attacker's own host,
    which does not answer for those ids.
    """

    def __init__(self, peer: SyntheticPeer) -> None:
        self.peer = peer
        self.minted: list[str] = []
        # Our own validator would check nothing useful here and only costs time.
        peer.node.pubsub.remove_topic_validator(peer.node.topic)

    async def publish(self, count: int, *, gap_s: float = 0.01, version: int = 1) -> None:
        """Publish `count` announcements, each from a new identity, `gap_s` apart."""
        node = self.peer.node
        data = encode_adapter(synthetic_state(version))
        addr = node.listen_addrs[0].partition("/p2p/")[0]
        for _ in range(count):
            keys = generate_new_ed25519_identity()
            sybil = ID.from_pubkey(keys.public_key)
            announcement = Announcement(
                swarm=node.swarm, peer=str(sybil), version=version, samples=16,
                digest=digest(data), nbytes=len(data), train_loss=1.0,
                addrs=(f"{addr}/p2p/{sybil}",),
            )
            msg = rpc_pb2.Message(data=announcement.to_wire(), topicIDs=[node.topic],
                                  from_id=sybil.to_bytes(), seqno=(1).to_bytes(8, "big"))
            msg.signature = keys.private_key.sign(
                PUBSUB_SIGNING_PREFIX.encode() + msg.SerializeToString())
            msg.key = keys.public_key.serialize()
            await node.pubsub.push_msg(node.pubsub.my_id, msg)
            self.minted.append(str(sybil))
            await trio.sleep(gap_s)

"""Sixteen real libp2p peers in one process, all joined through one bootstrap peer.

No language model: synthetic adapters (`testbed.loopback`), so the test measures the network
layer alone. Every peer must find and connect to `fanout` neighbours besides the bootstrap
peer; then the bootstrap peer dies and a new adapter version still reaches everyone.
"""

from __future__ import annotations

from functools import partial

import trio

from gossip.config import NodeConfig
from testbed.loopback import SyntheticPeer, loopback_swarm
from topology.config import TopologyConfig

PEERS = 16
FANOUT = 2


def _has_neighbours_beyond(peer: SyntheticPeer, boot: SyntheticPeer) -> bool:
    others = [p for p in peer.membership.neighbours() if p != boot.peer_id]
    return len(others) >= FANOUT and len(peer.membership.sample(FANOUT)) == FANOUT


def _heard(peer: SyntheticPeer, source: SyntheticPeer, version: int) -> bool:
    latest = peer.membership.latest(source.peer_id)
    return latest is not None and latest.version == version


async def test_sixteen_peers_find_neighbours_and_outlive_their_bootstrap() -> None:
    topology = TopologyConfig(fanout=FANOUT, target_connections=4, peer_timeout_s=60)
    network = NodeConfig(min_upload_interval_s=0)
    # A bound, not a speed goal: 16 hosts in one process share a core with whatever else runs.
    with trio.fail_after(240):
        async with loopback_swarm(PEERS, network=network, topology=topology, seed=7) as swarm:
            boot, rest = swarm.peers[0], swarm.peers[1:]
            # 1. Everyone knew only the bootstrap address; announcements spread the others.
            await swarm.announce_all()
            for peer in rest:
                await peer.membership.wait_until(partial(_has_neighbours_beyond, peer, boot))
            connections = sorted(len(peer.node.connected_peers()) for peer in rest)
            print(f"connections of the 15 joiners: {connections}")
            assert all(peer.membership.statistics().bootstrap_failures == 0 for peer in rest)

            # 2. The bootstrap peer dies; nobody is special.
            boot.stop()
            await boot.stopped.wait()
            source = rest[4]
            source.hold(1)
            await source.announce()
            for peer in rest:
                if peer is not source:
                    await peer.membership.wait_until(partial(_heard, peer, source, 1))

            # 3. The adapter itself spreads by pull rounds from random live neighbours.
            rounds = 0
            while any(peer.version < 1 for peer in rest):
                assert rounds < 12, "version 1 stopped spreading"
                await swarm.pull_round(FANOUT)
                rounds += 1
            print(f"version 1 reached all {len(rest)} peers in {rounds} pull rounds")
            assert all(peer.version == 1 for peer in rest)
            assert all(peer.node.server.current is not None for peer in rest)

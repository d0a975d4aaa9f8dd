"""The pieces a loaded peer runs, wired together: its node, membership and what uses them."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gossip.config import NodeConfig
from gossip.membership import Membership
from gossip.nodes import Node
from merge.registry import rule
from peer.config import PeerConfig
from peer.gather import Gatherer
from peer.publish import Publisher
from peer.records import Records
from peer.setup import Runtime
from peer.stats import PeerStatistics
from topology.view import MembershipView

# Makes the network node from its config, the swarm id and the identity folder. Tests pass a
# fake one, to run the round logic without libp2p.
NodeFactory = Callable[[NodeConfig, bytes, Path | None], Node]


@dataclass(frozen=True)
class Parts:
    """What a `Peer` joins the swarm with, once its model and data are loaded."""

    runtime: Runtime
    node: Node
    membership: Membership
    gatherer: Gatherer
    publisher: Publisher
    records: Records


def assemble(config: PeerConfig, runtime: Runtime, stats: PeerStatistics, rng: random.Random,
             node_factory: NodeFactory) -> Parts:
    """Make the node and wire every part to it, each holding only the references it uses."""
    rank_free = rule(config.merge.rule).rank_free
    node = node_factory(config.network, runtime.swarm, config.data_dir)
    view = MembershipView(config.topology, node.peer_id)
    membership = Membership(node, config.topology, rng, view=view,
                            tick_s=config.topology.tick_s)
    gatherer = Gatherer(node, membership, config.merge, fanout=config.topology.fanout,
                        settle_fanout=config.topology.settling_fanout,
                        fetch_timeout_s=config.network.fetch_timeout_s, rank_free=rank_free,
                        stats=stats, require_dp=config.privacy.require_dp)
    return Parts(
        runtime=runtime, node=node, membership=membership, gatherer=gatherer,
        publisher=Publisher(node, membership, config, runtime, stats, rank_free=rank_free),
        records=Records(runtime, node, membership, stats),
    )

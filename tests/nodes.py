"""Real `GossipNode`s on 127.0.0.1 for the network tests: started, joined, stopped."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import trio

from gossip.node import GossipNode, NodeConfig
from gossip.swarm import swarm_id

SWARM = swarm_id("model-fingerprint", {"r": 4}, 0)


@contextlib.asynccontextmanager
async def running(*configs: NodeConfig, swarm: bytes = SWARM) -> AsyncIterator[list[GossipNode]]:
    """One node per config, each after the first connected to the first; all stopped after."""
    async with trio.open_nursery() as nursery:
        nodes = [GossipNode(config, swarm, identity_dir=None) for config in configs]
        for node in nodes:
            await nursery.start(node.run)
        for node in nodes[1:]:
            with trio.fail_after(10):
                await node.connect(nodes[0].listen_addrs[0])
        yield nodes
        nursery.cancel_scope.cancel()

"""A peer's presence on a network, as the daemon and the membership service use it: a
`GossipNode` on real libp2p, or a `MemoryNode` on the simulator's in-memory network. Both serve
and receive through the same `gossip.endpoint.Endpoint`."""

from gossip.memory import MemoryNode
from gossip.node import GossipNode

Node = GossipNode | MemoryNode

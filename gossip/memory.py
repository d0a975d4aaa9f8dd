"""The swarm over an in-memory network: many peers of one process without libp2p.

`MemoryNetwork.node` is a `peer.parts.NodeFactory`: a `Peer` built with it runs every part above
the network seam unchanged (membership view, sampling, gathering, merging, checkpoints,
metrics, attacks, churn); only the bytes travel in memory, with a latency and a rate per peer:

- **Announcements** spread epidemically, as gossipsub floods them: from the publisher along the
  connections peers dialled (`connect`, `dial`), breadth first. A peer hears one after the sum
  of the one-way delays along its path; one that no path reaches never hears it. The bytes are
  the signed wire form (`Announcement.to_wire`), decoded and checked once per publish for all
  receivers of one swarm and size cap, not once per hop; sequence numbers start from the wall
  clock at a node's start, as py-libp2p's do, so a restarted peer's are fresh.
- **Transfers** run the real protocol (`gossip.transfer.AdapterServer` on one side,
  `gossip.fetcher.fetch_adapter` on the other) over an in-memory stream: the same request, the
  same signed header, the same encoded update bytes, limits and checks. Each direction of a
  stream delivers a write after the two peers' one-way delays, and a write takes its size over
  the slower of the two rates to leave; a peer's uploads share its rate (one at a time).

What it leaves out: the cost of the transports (noise, yamux, gossipsub's control traffic) and
their failure modes, bandwidth spent on announcements (a few hundred bytes each), and NATs.
Real libp2p stays the check of deployed code: `scripts/simulate.py` runs both.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import trio
from libp2p.peer.id import ID

from gossip.addresses import Scope
from gossip.catchup import MAX_ENTRIES, MIN_INTERVAL_S, Recent
from gossip.config import NodeConfig
from gossip.endpoint import Endpoint, Heard
from gossip.errors import GossipError, WireError
from gossip.hardening import host_key_pair
from gossip.reachability import UNKNOWN, Reachability
from gossip.spacing import Spacing
from gossip.swarm import topic_name
from gossip.wire import Announcement

__all__ = ["LinkShape", "MemoryNetwork", "MemoryNode"]


@dataclass(frozen=True)
class LinkShape:
    """One peer's access link: its one-way delay, and its rate each way in bytes per second."""

    delay_s: float = 0.001
    rate_bps: float = math.inf

    def __post_init__(self) -> None:
        if not (self.delay_s >= 0 and math.isfinite(self.delay_s) and self.rate_bps > 0):
            raise ValueError(f"a link needs a finite delay >= 0 and a rate > 0, got {self}")


class MemoryNetwork:
    """The in-memory network of one process's peers.

    Args:
        default: the link of every peer not named in `links`.
        links: a peer's link by the name of its identity folder (its data folder: `p3`).
    """

    def __init__(self, default: LinkShape = LinkShape(),
                 links: Mapping[str, LinkShape] | None = None) -> None:
        self.default = default
        self.links = dict(links or {})
        self.nodes: dict[str, MemoryNode] = {}  # running nodes by peer id
        self.publishes = 0
        self.deliveries = 0
        self.made = 0  # nodes made: each one's number in its address (`/memory/N`)
        self._version = 0  # of the connection graph: a change drops the cached paths
        self._paths: dict[str, tuple[int, list[tuple[float, str]]]] = {}

    def node(self, config: NodeConfig, swarm: bytes, identity_dir: Path | None) -> MemoryNode:
        """A node for a `Peer` (the `NodeFactory` signature)."""
        name = identity_dir.name if identity_dir is not None else ""
        self.made += 1
        return MemoryNode(self, config, swarm, identity_dir, self.links.get(name, self.default),
                          number=self.made)

    def running(self, peer: str) -> MemoryNode | None:
        return self.nodes.get(peer)

    def join(self, node: MemoryNode) -> None:
        """`node` runs from now on (a restarted peer's node replaces its old one)."""
        old = self.nodes.get(node.peer_id)
        if old is not None and old is not node:
            self.leave(old)
        self.nodes[node.peer_id] = node
        self._changed()

    def leave(self, node: MemoryNode) -> None:
        """`node` stopped: its connections close at both ends."""
        if self.nodes.get(node.peer_id) is node:
            del self.nodes[node.peer_id]
        for other in node.connections:
            peer = self.nodes.get(other)
            if peer is not None:
                peer.connections.discard(node.peer_id)
        node.connections.clear()
        self._changed()

    def connect(self, a: MemoryNode, b: MemoryNode) -> None:
        if b.peer_id not in a.connections:
            a.connections.add(b.peer_id)
            b.connections.add(a.peer_id)
            self._changed()

    def arrivals(self, source: MemoryNode) -> list[tuple[float, str]]:
        """(delay, peer) for every running peer an announcement of `source` reaches, by delay:
        breadth first along connections, each hop costing both ends' one-way delays."""
        cached = self._paths.get(source.peer_id)
        if cached is not None and cached[0] == self._version:
            return cached[1]
        reached = {source.peer_id: 0.0}
        queue = deque([source])
        while queue:
            node = queue.popleft()
            for peer in node.connections:
                other = self.nodes.get(peer)
                if other is not None and peer not in reached:
                    reached[peer] = reached[node.peer_id] + node.link.delay_s + other.link.delay_s
                    queue.append(other)
        del reached[source.peer_id]
        found = sorted((delay, peer) for peer, delay in reached.items())
        self._paths[source.peer_id] = (self._version, found)
        return found

    async def deliver(self, source: str, data: bytes, seqno: int,
                      arrivals: Sequence[tuple[float, str]]) -> None:
        """Hand `data` to each peer at its arrival time (from now), decoded once per swarm."""
        start = trio.current_time()
        decoded: dict[tuple[bytes, int], Announcement | WireError] = {}
        for delay, peer in arrivals:
            await trio.sleep_until(start + delay)
            node = self.nodes.get(peer)
            if node is None:
                continue
            key = (node.swarm, node.config.max_adapter_bytes)
            if key not in decoded:
                try:
                    decoded[key] = Announcement.from_wire(data, swarm=key[0], max_nbytes=key[1])
                except WireError as exc:
                    decoded[key] = exc
            node.hear(source, decoded[key], seqno)
            self.deliveries += 1

    def statistics(self) -> dict[str, Any]:
        return {"nodes": len(self.nodes), "publishes": self.publishes,
                "deliveries": self.deliveries}

    def _changed(self) -> None:
        self._version += 1


class MemoryNode(Endpoint):
    """One peer's presence on a `MemoryNetwork`: what a `GossipNode` offers the daemon."""

    def __init__(self, network: MemoryNetwork, config: NodeConfig, swarm: bytes,
                 identity_dir: Path | None, link: LinkShape, *, number: int = 0) -> None:
        key_pair = host_key_pair(identity_dir)  # the same id after a restart, as on libp2p
        super().__init__(config, swarm, str(ID.from_pubkey(key_pair.public_key)),
                         key_pair.private_key.sign)
        self.network = network
        self.link = link
        self.number = number
        self.topic = topic_name(swarm)
        self.connections: set[str] = set()
        self.uplink = trio.Lock()  # our uploads share our rate
        self._seqno = time.time_ns()
        self._nursery: trio.Nursery | None = None
        # Each signer's newest announcement, and who had a catch-up when (`gossip.catchup`).
        self.recent: Recent[tuple[Announcement, int]] = Recent()
        self._catchup_spacing = Spacing(MIN_INTERVAL_S)

    @property
    def listen_addrs(self) -> list[str]:
        return [f"/memory/{self.number}/p2p/{self.peer_id}"]

    @property
    def announce_addrs(self) -> list[str]:
        return self.listen_addrs

    def relay_status(self) -> dict[str, Any]:
        return {}

    def relayed_only(self) -> set[str]:
        return set()

    @property
    def reachability(self) -> Reachability:
        return Reachability(UNKNOWN, "the in-memory network has no addresses to dial back")

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Be on the network until cancelled; deliveries and uploads run in this nursery."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self.network.join(self)
                task_status.started(self)
                await trio.sleep_forever()
        finally:
            self._nursery = None
            self.network.leave(self)

    def spawn(self, function: Any, *args: Any) -> None:
        if self._nursery is None:
            raise GossipError("the node is not running")
        self._nursery.start_soon(function, *args)

    async def publish(self, announcement: Announcement) -> None:
        """Send an announcement to every peer connections reach; it becomes `current`."""
        self.current = announcement
        self._seqno += 1
        self.recent.keep(self.peer_id, self._seqno, (announcement, self._seqno))
        arrivals = self.network.arrivals(self)
        self.spawn(self.network.deliver, self.peer_id, announcement.to_wire(), self._seqno,
                   arrivals)
        self.network.publishes += 1
        self.published_at = trio.current_time()

    def hear(self, source: str, announcement: Announcement | WireError, seqno: int) -> None:
        """A delivery: refused as a libp2p validator would, else queued for the membership."""
        if isinstance(announcement, WireError):
            self._reject(announcement.reason, "announcement from %s: %s", source, announcement)
        elif announcement.peer != source:
            self._reject("signer_mismatch", "announcement from %s claims %s", source,
                         announcement.peer)
        else:
            self.recent.keep(source, seqno, (announcement, seqno))
            try:
                self._send.send_nowait(Heard(announcement, seqno, Scope.PUBLIC))
            except trio.WouldBlock:
                self._reject("queue_full", "announcement from %s: queue_full: the daemon is "
                             "behind", source)

    async def connect(self, addr: str) -> str:
        """Dial a full address (with /p2p/<id>); returns the peer id."""
        peer = addr.rpartition("/p2p/")[2]
        await self.dial(peer)
        return peer

    async def dial(self, peer: str) -> None:
        """Connect to `peer`, one round trip away.

        Raises:
            GossipError: it is not running.
        """
        other = self.network.running(peer)
        if other is None or other is self:
            raise GossipError(f"cannot reach {peer}: not on the network")
        await trio.sleep(2 * (self.link.delay_s + other.link.delay_s))
        if self.network.running(peer) is other and self._nursery is not None:
            self.network.connect(self, other)

    def remember(self, peer: str, addrs: Sequence[str], *, via: str = Scope.PUBLIC) -> list[str]:
        """The announced addresses that name `peer` itself (others count as "bad_addr")."""
        kept = [addr for addr in addrs if addr.endswith(f"/p2p/{peer}")]
        if len(kept) < len(addrs):
            self.rejected["bad_addr"] += len(addrs) - len(kept)
        return kept

    def forget(self, peer: str) -> None:
        self._forget_received(peer)
        self.recent.forget(peer)

    async def catch_up(self, peer: str) -> int:
        """Hear the newest announcements `peer` holds, a round trip away, as a `GossipNode`
        does over `gossip.catchup` (with its server's spacing). Returns how many came.

        Raises:
            GossipError: `peer` is not on the network.
        """
        server = self.network.running(peer)
        if server is None:
            raise GossipError(f"cannot reach {peer}: not on the network")
        self.catchups["asked"] += 1
        await trio.sleep(2 * (self.link.delay_s + server.link.delay_s))
        if not server._catchup_spacing.admit([self.peer_id]):
            server.catchups_served["rate_limited"] += 1
            return 0
        server.catchups_served["ok"] += 1
        entries = server.recent.newest(MAX_ENTRIES)
        for announcement, seqno in entries:
            await self._caught_up(announcement, seqno, Scope.PUBLIC)
        return len(entries)

    def connected_peers(self) -> list[str]:
        return [peer for peer in self.connections if peer in self.network.nodes]

    def topic_peers(self) -> list[str]:
        return sorted(self.connected_peers())

    async def _open_stream(self, peer: str) -> Any:
        """A transfer stream to `peer`, whose server answers it in its own nursery."""
        server = self.network.running(peer)
        if server is None or server._nursery is None:
            raise OSError(f"{peer} is not on the network")
        delay = self.link.delay_s + server.link.delay_s
        up = _Pipe(delay, min(self.link.rate_bps, server.link.rate_bps), self.uplink)
        down = _Pipe(delay, min(self.link.rate_bps, server.link.rate_bps), server.uplink)
        server.spawn(server.server.handle, MemoryStream(down, up, self.peer_id))
        return MemoryStream(up, down, server.peer_id)


class _Pipe:
    """One direction of a stream: a write leaves at the rate, then arrives after the delay."""

    def __init__(self, delay_s: float, rate_bps: float, uplink: trio.Lock) -> None:
        self._delay_s, self._rate_bps, self._uplink = delay_s, rate_bps, uplink
        self._send, self._receive = trio.open_memory_channel[tuple[float, bytes]](math.inf)
        self._buffer = b""

    async def write(self, data: bytes) -> None:
        async with self._uplink:
            if math.isfinite(self._rate_bps):
                await trio.sleep(len(data) / self._rate_bps)
            self._send.send_nowait((trio.current_time() + self._delay_s, bytes(data)))

    async def read(self, n: int) -> bytes:
        if not self._buffer:
            try:
                arrives, self._buffer = await self._receive.receive()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                return b""
            await trio.sleep_until(arrives)
        data, self._buffer = self._buffer[:n], self._buffer[n:]
        return data

    def close_write(self) -> None:
        self._send.close()

    def close_read(self) -> None:
        self._receive.close()


class MemoryStream:
    """What the transfer protocol uses of a libp2p stream: read, write, close, the remote id."""

    def __init__(self, outgoing: _Pipe, incoming: _Pipe, remote: str) -> None:
        self._out, self._in = outgoing, incoming
        self.muxed_conn = SimpleNamespace(peer_id=remote)

    async def read(self, n: int = -1) -> bytes:
        return await self._in.read(n if n > 0 else 1 << 20)

    async def write(self, data: bytes) -> None:
        try:
            await self._out.write(data)
        except trio.ClosedResourceError as exc:
            raise trio.BrokenResourceError("the stream is closed") from exc

    async def close(self) -> None:
        self._out.close_write()
        self._in.close_read()

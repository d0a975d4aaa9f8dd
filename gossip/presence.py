"""How others reach a libp2p node, and whom it reaches through relays.

`Presence` is the part of `gossip.node.GossipNode` that answers address and NAT questions from
state other objects own: where we listen and what we announce (the router's forwarded ports,
`--announce`, our circuit addresses), whether a dial-back probe found us reachable, whether we
relay for others, which peers to ask for a relay slot, and which peers a hole punch reached
directly. It starts nothing; the node builds and runs the services it reads.
"""

from __future__ import annotations

from typing import Any

from libp2p.abc import IHost
from libp2p.peer.id import ID

from gossip.addresses import expand_unspecified, interface_ips
from gossip.config import NodeConfig
from gossip.dialer import Dialer
from gossip.holepunch import Puncher
from gossip.reachability import PUBLIC, Reachability, ReachabilityProbe, tcp_ports
from gossip.relay import GuardedRelay, RelayClient, is_relayed
from gossip.upnp import PortMapper
from gossip.wire import MAX_ADDRS

__all__ = ["Presence"]


class Presence:
    """Address and relay views of a libp2p node (a mixin of `GossipNode`, which sets these)."""

    host: IHost
    config: NodeConfig
    peer_id: str
    relay: GuardedRelay
    puncher: Puncher
    dialer: Dialer
    relay_client: RelayClient
    probe: ReachabilityProbe
    upnp: PortMapper
    _last_addrs: list[str]

    @property
    def reachability(self) -> Reachability:
        """Whether peers outside can dial us, as the last dial-back probe found."""
        return self.probe.current

    @property
    def listen_addrs(self) -> list[str]:
        """Full multiaddrs (with /p2p/<id>) that other peers can bootstrap from: a listener on
        0.0.0.0 (or ::) is listed at each interface's address, loopback last.

        The last known addresses are kept after the host closes, for the final status.
        """
        try:
            addrs = self.host.get_addrs()
        except OSError:  # the host is closing and its listener socket is gone (EBADF)
            addrs = []
        current = expand_unspecified(
            [str(addr) if "/p2p/" in str(addr) else f"{addr}/p2p/{self.peer_id}"
             for addr in addrs], interface_ips())
        if current:
            self._last_addrs = current
        return current or self._last_addrs

    @property
    def announce_addrs(self) -> list[str]:
        """Full multiaddrs our announcements carry: the router's forwarded ports (`--upnp`),
        `config.announce` if set, else where we listen (a peer behind a proxy or a NAT is
        dialled at an address it does not listen on), then our circuit addresses through the
        relays that hold a slot for us.
        """
        direct = self.listen_addrs if not self.config.announce else \
            [f"{addr}/p2p/{self.peer_id}" for addr in self.config.announce]
        direct = [f"{addr}/p2p/{self.peer_id}" for addr in self.upnp.addrs()] + direct
        circuits = self.relay_client.circuit_addrs()
        return [*direct[: MAX_ADDRS - len(circuits)], *circuits]

    def _mappable_ports(self) -> tuple[int, ...]:
        """The TCP ports we listen on beyond loopback: what a router could forward to us."""
        return tcp_ports([a for a in self.listen_addrs
                          if not a.startswith(("/ip4/127.", "/ip6/::1/"))])

    def _relaying(self) -> bool:
        mode = self.config.relay_service
        return mode == "on" or (mode == "auto" and self.reachability.status == PUBLIC)

    def _relay_candidates(self) -> list[str]:
        """Relays to ask, each group in random order: peers we hold a direct connection to,
        then peers with an address we may dial (from their own announcements)."""
        network, rng = self.host.get_network(), self.probe.rng
        connected = [str(p) for p in self.host.get_connected_peers()
                     if any(not is_relayed(c) for c in network.get_connections(p))]
        any_conn = {str(p) for p in self.host.get_connected_peers()}
        others = [p for p in self.dialer.dialable() if p not in any_conn]
        rng.shuffle(connected)
        rng.shuffle(others)
        return [*connected, *others]

    def relayed_only(self) -> set[str]:
        """Peers we reach only through a relay: their hole punch failed lately."""
        return self.puncher.failed_recently()

    def relay_status(self) -> dict[str, Any]:
        """What we relay for others and through whom we are reachable, for status.json."""
        return {"serving": self._relaying(), "held_here": self.relay.reservations,
                "forwarded_bytes": self.relay.forwarded,
                "granted_here": self.relay.reserved, "refused_here": dict(self.relay.refused),
                **self.relay_client.to_status(), "relayed_dials": dict(self.dialer.relayed_dials),
                "holepunch": dict(self.puncher.outcomes),
                **({"upnp": self.upnp.to_status()} if self.config.upnp else {})}

    def _punched(self, peer: str) -> bool:
        """Whether we hold a direct connection to `peer` though we last reached it through a
        relay: a hole punch made it. Kept after a fetch, since a redial would take the relay
        and another punch (about 1 s against 0.03 s in the NAT lab)."""
        if peer not in self.dialer.reached_by_relay:
            return False
        network = self.host.get_network()
        return any(not is_relayed(c) and not getattr(c, "is_closed", False)
                   for c in network.get_connections(ID.from_base58(peer)))

"""Asking the home router to forward our listen ports (UPnP IGD), for `--upnp`.

py-libp2p's own UPnP support maps the ports with no lease and without saying whether it
worked, and announces nothing (PY-LIBP2P-NAT.md). `PortMapper` maps each TCP listen port to
the same port on the router's public address with a lease of `LEASE_S`, renews it at half
that, says what happened in `status` (and in the log, once per change), and deletes the
mappings when the peer stops. Its `addrs` are what our announcements then carry first; the
reachability probe (`gossip.reachability`) checks that the swarm can use them.

miniupnpc's calls block (discovery waits for answers), so they run in a worker thread.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import trio

__all__ = ["LEASE_S", "PortMapper"]

logger = logging.getLogger(__name__)

LEASE_S = 3600
DISCOVER_MS = 1000
RETRY_S = 300.0  # after a failure, before asking the router again
DESCRIPTION = "loraswarm"


class UpnpError(Exception):
    """The router could not be found or refused the mapping; the message says which."""


def _map(ports: Sequence[int]) -> tuple[str, str]:
    """Map `ports` on the router (blocking). Returns (router's public IP, our LAN address)."""
    import miniupnpc  # py-libp2p's dependency; imported here so that only --upnp needs it

    router: Any = miniupnpc.UPnP()
    router.discoverdelay = DISCOVER_MS
    try:
        found = router.discover()
    except Exception:  # miniupnpc raises Exception("Success") on some systems, found or not
        found = -1
    if found == 0:
        raise UpnpError("no UPnP router answered on this network")
    try:
        router.selectigd()
    except Exception as exc:  # miniupnpc raises plain Exception
        raise UpnpError("no UPnP router answered on this network" if found < 0 else
                        f"no Internet gateway among the UPnP devices: {exc}") from exc
    external = router.externalipaddress()
    if not external:
        raise UpnpError("the router has no public address (behind another NAT?)")
    if not ipaddress.ip_address(external).is_global:
        raise UpnpError(f"the router's public address {external} is private: another NAT "
                        "lies behind it, so a mapping would not make us reachable")
    for port in ports:
        try:
            router.addportmapping(port, "TCP", router.lanaddr, port, DESCRIPTION, "", LEASE_S)
        except Exception as exc:  # miniupnpc raises plain Exception with the router's error
            raise UpnpError(f"the router refused to map TCP port {port}: {exc}") from exc
    return str(external), str(router.lanaddr)


def _unmap(ports: Sequence[int]) -> None:
    import miniupnpc

    router: Any = miniupnpc.UPnP()
    router.discoverdelay = DISCOVER_MS
    try:
        router.discover()
        router.selectigd()
    except Exception:  # the router went away: its mappings expire with their lease
        return
    for port in ports:
        try:
            router.deleteportmapping(port, "TCP")
        except Exception:  # already gone: nothing to undo
            continue


class PortMapper:
    """Keeps our TCP listen ports mapped on the router while the peer runs.

    Args:
        ports: our TCP listen ports now.
        on_change: called when the mapped addresses change (a new announcement is due).
    """

    def __init__(self, ports: Callable[[], Sequence[int]],
                 on_change: Callable[[], None] = lambda: None) -> None:
        self._ports = ports
        self._on_change = on_change
        self.external: str | None = None
        self.mapped: tuple[int, ...] = ()
        self.error: str | None = None

    def addrs(self) -> list[str]:
        """Our addresses on the router's public side (without /p2p/)."""
        if self.external is None:
            return []
        family = "ip6" if ":" in self.external else "ip4"
        return [f"/{family}/{self.external}/tcp/{port}" for port in self.mapped]

    def to_status(self) -> dict[str, Any]:
        """As status.json shows it."""
        return {"mapped": self.addrs(), "error": self.error}

    async def run(self) -> None:
        """Map, renew at half the lease, retry after failures; unmap when cancelled."""
        try:
            while True:
                await self._refresh()
                await trio.sleep(LEASE_S / 2 if self.error is None else RETRY_S)
        finally:
            if self.mapped:
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    await trio.to_thread.run_sync(partial(_unmap, self.mapped))

    async def _refresh(self) -> None:
        ports = tuple(p for p in self._ports() if p)
        if not ports:
            return
        try:
            external, lan = await trio.to_thread.run_sync(partial(_map, ports))
        except UpnpError as exc:
            if str(exc) != self.error:
                logger.warning("UPnP: %s; others can reach us only through a relay or a port "
                               "forward (--announce)", exc)
            self.error = str(exc)
            self.external, self.mapped = None, ()
            self._on_change()
            return
        changed = (external, ports) != (self.external, self.mapped)
        self.external, self.mapped, self.error = external, ports, None
        if changed:
            logger.info("UPnP: the router forwards %s TCP %s to us at %s", external,
                        ",".join(map(str, ports)), lan)
            self._on_change()

"""Which announced addresses a peer may dial, and how often.

Announced addresses are a remote peer's claim. Dialled as given, by every member, they turned the
swarm into a dial reflector: a bare `/ip4/VICTIM/tcp/443` or an address in the victim's private
network got dialled by everyone on every tick and fetch. So:

1. an address must name the announcer itself (`/p2p/<its id>`): a peer may only say where it
   lives;
2. loopback and private addresses are dialled only when the announcement reached us through a
   connection from the same kind of address (peers on one machine, or one LAN), or when the
   user allows them (`--allow-private-addrs`); unspecified, multicast and reserved ones never;
3. each address that fails backs off on its own (`AddressBackoff`), so a dead or hostile address
   costs a bounded number of dials however often it is announced.
"""

from __future__ import annotations

import ipaddress
import random
import socket
from collections import OrderedDict
from collections.abc import Iterable, Sequence

import multiaddr
import psutil

from topology.discovery import backoff_delay

__all__ = ["AddressBackoff", "Scope", "address_scope", "circuit_relay", "expand_unspecified",
           "interface_ips", "usable_addrs"]

_BACKOFF_BASE_S, _BACKOFF_CAP_S = 1.0, 300.0
_BACKOFF_ENTRIES = 4096


class Scope:
    """Kinds of addresses, from the narrowest reach to the widest."""

    LOOPBACK = "loopback"
    PRIVATE = "private"
    PUBLIC = "public"
    NEVER = "never"  # unspecified, multicast, reserved: no peer lives there


def address_scope(addr: multiaddr.Multiaddr | str) -> str:
    """The scope of an address's IP (a DNS name counts as public)."""
    text = str(addr)
    parts = text.split("/")
    for proto, value in zip(parts[1::2], parts[2::2], strict=False):
        if proto in ("ip4", "ip6"):
            return _ip_scope(value)
    return Scope.PUBLIC


def _ip_scope(value: str) -> str:
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        return Scope.NEVER
    if ip.is_loopback:  # before is_reserved, which ::1 also is (::/8)
        return Scope.LOOPBACK
    if ip.is_unspecified or ip.is_multicast or ip.is_reserved:
        return Scope.NEVER
    if ip.is_private or ip.is_link_local:
        return Scope.PRIVATE
    return Scope.PUBLIC


def interface_ips() -> list[str]:
    """This machine's IP addresses, from every interface that is up (IPv6 link-local left out:
    it needs a zone to be dialled)."""
    up = {name for name, stats in psutil.net_if_stats().items() if stats.isup}
    ips: list[str] = []
    for name, entries in psutil.net_if_addrs().items():
        for entry in entries:
            ip = entry.address.partition("%")[0]
            if name in up and entry.family in (socket.AF_INET, socket.AF_INET6) \
                    and not ipaddress.ip_address(ip).is_link_local:
                ips.append(ip)
    return ips


_WIDEST_FIRST = {Scope.PUBLIC: 0, Scope.PRIVATE: 1, Scope.LOOPBACK: 2}


def expand_unspecified(addrs: Iterable[str], ips: Sequence[str]) -> list[str]:
    """Replace each `/ip4/0.0.0.0/...` (or `/ip6/::/...`) by one address per IP of that family.

    A listener on 0.0.0.0 accepts on every interface, but 0.0.0.0 is no address to dial. The
    expanded ones come widest first (public, private, loopback last): a peer tries them in
    order, and a loopback address only ever works on this machine.
    """
    order = sorted(ips, key=lambda ip: _WIDEST_FIRST.get(_ip_scope(ip), 3))
    expanded: list[str] = []
    for addr in addrs:
        parts = addr.split("/")
        family = parts[1] if len(parts) > 2 else ""
        if family not in ("ip4", "ip6") or not ipaddress.ip_address(parts[2]).is_unspecified:
            expanded.append(addr)
            continue
        for ip in order:
            if (":" in ip) == (family == "ip6") and _ip_scope(ip) != Scope.NEVER:
                expanded.append("/".join([*parts[:2], ip, *parts[3:]]))
    return list(dict.fromkeys(expanded))


def usable_addrs(peer: str, addrs: Iterable[str], *, via: str,
                 allow_private: bool) -> tuple[list[str], int]:
    """The announced addresses of `peer` that we may dial, and how many were refused.

    Args:
        peer: the announcer's id; every address must end in `/p2p/<peer>`.
        addrs: the announced addresses.
        via: the scope of the connection the announcement arrived on.
        allow_private: dial loopback and private addresses whatever `via` is.
    """
    kept: list[str] = []
    refused = 0
    for addr in addrs:
        base, _, named = addr.partition("/p2p/")
        if named == peer and _may_dial(address_scope(base), via, allow_private):
            kept.append(addr)
        elif circuit_relay(addr, peer) is not None:
            kept.append(addr)  # only the relay id is used: see `circuit_relay`
        else:
            refused += 1
    return kept, refused


def circuit_relay(addr: str, peer: str) -> str | None:
    """The relay of a circuit address of `peer` (`.../p2p/<relay>/p2p-circuit/p2p/<peer>`).

    Only the relay's id is taken from it: the relay is dialled at the addresses it announced
    itself, so that a circuit address cannot point the swarm's dials at a third party.
    """
    head, found, tail = addr.rpartition("/p2p-circuit/p2p/")
    if not found or tail != peer:
        return None
    relay = head.rpartition("/p2p/")[2]
    if not relay or "/" in relay or relay == peer:
        return None
    return relay


def _may_dial(scope: str, via: str, allow_private: bool) -> bool:
    if scope in (Scope.LOOPBACK, Scope.PRIVATE):
        return allow_private or scope == via
    return scope == Scope.PUBLIC


class AddressBackoff:
    """Per-address dial backoff: exponential with full jitter, bounded in memory."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()
        self._entries: OrderedDict[str, tuple[int, float]] = OrderedDict()

    def ready(self, addrs: Sequence[str], now: float) -> list[str]:
        """The addresses not backing off at time `now`."""
        return [a for a in addrs if self._entries.get(a, (0, now))[1] <= now]

    def failed(self, addr: str, now: float) -> float:
        """Record a failed dial of `addr`; returns the delay before it may be dialled again."""
        failures = self._entries.pop(addr, (0, 0.0))[0]
        delay = backoff_delay(failures, self._rng, base_s=_BACKOFF_BASE_S, cap_s=_BACKOFF_CAP_S)
        # At least the base: full jitter may draw 0, and 0 would let a flood redial at once.
        delay = max(delay, _BACKOFF_BASE_S)
        self._entries[addr] = (failures + 1, now + delay)
        while len(self._entries) > _BACKOFF_ENTRIES:
            self._entries.popitem(last=False)
        return delay

    def succeeded(self, addr: str) -> None:
        """Forget the failures of `addr`."""
        self._entries.pop(addr, None)

"""Hole punching (DCUtR) after a relayed dial: a direct connection when the NATs allow one.

py-libp2p 0.8.1's `DCUtRProtocol` does the exchange (each side learns the other's public
address from the relay's view, then both dial at once from their listen port, a TCP
simultaneous open). What we change, from measurements in the NAT lab (README, "Peers behind
NAT"):

1. Only the dialler punches, once, right after its relayed dial, and waits at most
   `WAIT_S` before the fetch goes on over the relay. The library's own loop punched from
   both sides every 2 s: the two attempts fought over one port ("Cannot assign requested
   address") and lost 3 of 5 punches that one side alone won.
2. The peer's peerstore addresses are cleared first: the library first dials every address
   identify reported (a 0.0.0.0 listener reports 0.0.0.0, which reaches our own listener, and
   LAN addresses cost the whole 10 s dial timeout) before it starts the exchange.
3. A peer whose punch failed is not punched again for `RETRY_S`: behind routers that reset
   unsolicited SYNs a punch never succeeds and a failed one takes about 21 s.

New streams prefer a direct connection over a relayed one (py-libp2p's default), so a fetch
after a successful punch moves its bytes directly.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict

import trio
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol

__all__ = ["Puncher"]

logger = logging.getLogger(__name__)

WAIT_S = 2.0  # measured: punches that worked took 0.3-1.1 s in the lab
RETRY_S = 600.0
_REMEMBERED = 1024


class Puncher(DCUtRProtocol):
    """The library's DCUtR service, punched from the dialler only (module docstring)."""

    def __init__(self, host: object) -> None:
        super().__init__(host)  # type: ignore[arg-type]
        self.outcomes: Counter[str] = Counter()  # attempts, successes, failures, skipped
        self._failed: OrderedDict[str, float] = OrderedDict()

    async def _auto_drive_loop(self) -> None:
        """The library punches every relayed peer from here, from both sides: not us."""
        return None

    def failed_recently(self) -> set[str]:
        """Peers whose last punch failed within `RETRY_S`: reached only through a relay."""
        since = trio.current_time() - RETRY_S
        return {peer for peer, at in self._failed.items() if at > since}

    async def punch(self, peer: str) -> bool:
        """Try for a direct connection to `peer` (relay-connected); True when one exists."""
        now = trio.current_time()
        if self._failed.get(peer, -RETRY_S) > now - RETRY_S:
            self.outcomes["skipped"] += 1
            return False
        self.outcomes["attempts"] += 1
        pid = ID.from_base58(peer)
        self.host.get_peerstore().clear_addrs(pid)
        succeeded = False
        with trio.move_on_after(WAIT_S):
            try:
                succeeded = await self.initiate_hole_punch(pid)
            except Exception as exc:  # the library's stream and dial errors share no base
                logger.debug("hole punch to %s: %s: %s", peer, type(exc).__name__, exc)
        if succeeded:
            self.outcomes["successes"] += 1
            self._failed.pop(peer, None)
            logger.info("hole punched: a direct connection to %s", peer)
            return True
        self.outcomes["failures"] += 1
        self._failed[peer] = now
        while len(self._failed) > _REMEMBERED:
            self._failed.popitem(last=False)
        logger.info("hole punch to %s failed; its transfers stay on the relay", peer)
        return False

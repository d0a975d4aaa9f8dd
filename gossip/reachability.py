"""Whether the swarm can dial us: a few neighbours dial us back (`gossip.dialback`) and vote.

`ReachabilityProbe.run` asks up to `ASKED` random connected peers once the first one is
connected, then every `interval_s` (sooner, `RETRY_S`, while the answer is unknown). Each
answer counts as reachable (some announced port answered), unreachable (none did), or no
answer (rate-limited, refused, no such protocol, broken). `verdict` needs agreement: one
hostile neighbour's lie must not decide when others answered.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from gossip.dialback import MIN_INTERVAL_S, DialbackReply

__all__ = ["ASKED", "PRIVATE", "PUBLIC", "UNKNOWN", "Reachability", "ReachabilityProbe",
           "tcp_ports", "verdict"]

logger = logging.getLogger(__name__)

ASKED = 3
RETRY_S = 30.0
_WAIT_FOR_PEERS_S = 2.0

PUBLIC, PRIVATE, UNKNOWN = "public", "private", "unknown"


@dataclass(frozen=True)
class Reachability:
    """What the last probe found: `status` (public, private or unknown) and why."""

    status: str = UNKNOWN
    why: str = "not probed yet"
    checked: float | None = None  # wall-clock time of the probe
    answers: dict[str, str] = field(default_factory=dict)  # peer -> what it found

    def to_status(self) -> dict[str, Any]:
        """As status.json shows it."""
        return {"status": self.status, "why": self.why, "checked": self.checked,
                "answers": dict(self.answers)}


def answer_of(reply: DialbackReply) -> str:
    """One neighbour's finding: reachable, unreachable, or the reason it did not dial."""
    if reply.status != "ok":
        return reply.status
    return "reachable" if "ok" in reply.outcomes else "unreachable"


def verdict(answers: dict[str, str], ports: Sequence[int], observed: Sequence[str] = ()) -> \
        Reachability:
    """Public or private when at least min(2, answered) neighbours agree and outnumber the rest.

    Args:
        answers: peer -> `answer_of` its reply (or an error's short name).
        ports: the ports we asked them to dial.
        observed: the addresses they saw us at (for the explanation).
    """
    yes = sum(a == "reachable" for a in answers.values())
    no = sum(a == "unreachable" for a in answers.values())
    needed = min(2, yes + no)
    at = f"{'/'.join(sorted(set(observed))) or 'our address'} port {'/'.join(map(str, ports))}"
    if needed and yes >= needed and yes > no:
        status, why = PUBLIC, f"{yes} of {len(answers)} peers dialled us back at {at}"
    elif needed and no >= needed and no > yes:
        status, why = PRIVATE, f"{no} of {len(answers)} peers could not dial us at {at}"
    elif not answers:
        status, why = UNKNOWN, "no connected peer to ask"
    else:
        status, why = UNKNOWN, (f"no agreement: {yes} reached us, {no} did not, "
                                f"{len(answers) - yes - no} did not answer")
    return Reachability(status, why, time.time(), dict(answers))


def tcp_ports(addrs: Sequence[str]) -> tuple[int, ...]:
    """The TCP ports of directly dialled addresses among `addrs` (relayed ones left out)."""
    ports: list[int] = []
    for addr in addrs:
        parts = addr.split("/")
        if "p2p-circuit" in parts or "tcp" not in parts:
            continue
        port = int(parts[parts.index("tcp") + 1])
        if port and port not in ports:
            ports.append(port)
    return tuple(ports[:4])


class ReachabilityProbe:
    """Asks neighbours to dial us back, now and then; `current` is the latest verdict.

    Args:
        ask: ask(peer, ports) -> the peer's reply (`gossip.dialback.ask_dialback` over a stream).
        peers: the peers connected now.
        addrs: the addresses we announce now.
        interval_s: time between probes once one gave an answer.
        on_verdict: called after each probe (the relay client acts on a new verdict at once).
    """

    def __init__(self, ask: Callable[[str, tuple[int, ...]], Awaitable[DialbackReply]],
                 peers: Callable[[], list[str]], addrs: Callable[[], list[str]], *,
                 interval_s: float, rng: random.Random | None = None,
                 on_verdict: Callable[[], None] = lambda: None) -> None:
        self._ask = ask
        self._on_verdict = on_verdict
        self._peers = peers
        self._addrs = addrs
        self._interval_s = interval_s
        self.rng = rng or random.Random()
        self.current = Reachability()
        self.probed = trio.Event()  # set after the first probe that found peers to ask
        self._woken = trio.Event()

    def wake(self) -> None:
        """Probe again now (our addresses changed), not after the interval."""
        self._woken.set()

    async def run(self) -> None:
        """Probe forever (cancel to stop)."""
        while True:
            peers = self._peers()
            if not peers:
                await trio.sleep(_WAIT_FOR_PEERS_S)
                continue
            self.current = await self.probe(peers)
            self.probed.set()
            self._on_verdict()
            logger.info("reachability: %s (%s)", self.current.status, self.current.why)
            asked_at = trio.current_time()
            with trio.move_on_after(RETRY_S if self.current.status == UNKNOWN
                                    else self._interval_s):
                await self._woken.wait()
            self._woken = trio.Event()
            # Woken early (our addresses changed): the neighbours serve one dial-back per
            # peer every MIN_INTERVAL_S, so ask no sooner.
            await trio.sleep(max(0.0, asked_at + MIN_INTERVAL_S - trio.current_time()))

    async def probe(self, peers: Sequence[str]) -> Reachability:
        """Ask up to `ASKED` of `peers` at once and return the verdict."""
        ports = tcp_ports(self._addrs())
        if not ports:
            return Reachability(UNKNOWN, "no TCP address to be dialled at", time.time())
        asked = self.rng.sample(list(peers), min(ASKED, len(peers)))
        answers: dict[str, str] = {}
        observed: list[str] = []

        async def one(peer: str) -> None:
            try:
                reply = await self._ask(peer, ports)
            except Exception as exc:  # no answer, whatever the reason: counted, never fatal
                answers[peer] = "no_answer"
                logger.debug("dial-back by %s: %s: %s", peer, type(exc).__name__, exc)
                return
            answers[peer] = answer_of(reply)
            if reply.observed:
                observed.append(reply.observed)

        async with trio.open_nursery() as nursery:
            for peer in asked:
                nursery.start_soon(one, peer)
        return verdict(answers, ports, observed)

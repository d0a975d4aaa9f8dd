"""Simulated peers behind wide-area links (`simulate.py --link`, `--link-profile`).

Each linked peer gets a `testbed.wan.LinkProxy` in the simulator's own trio process, whatever
runs the peer (a process, or this process): the proxy listens first, the peer announces the
proxy's address (`--announce`), and the proxy forwards each connection to wherever the peer
listens now, read from its status.json (a restarted peer listens on a new port). The bootstrap
address the other peers get is peer 0's proxy, so every connection to a linked peer crosses its
link. A profile file gives shares of the peers other links:

    # 25 % of the peers on a 5 Mbit/s home uplink, 10 % far away; the rest get --link
    [[links]]
    share = 0.25
    link = "delay=20ms,rate=5mbit"
    [[links]]
    share = 0.1
    link = "delay=150ms,jitter=20ms,rate=50mbit"
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import tomllib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import trio

from peer.config import PeerConfig
from testbed.wan import Link, LinkProxy

STATUS_POLL_S = 0.2  # how often a proxy looks for its peer's listen address while it has none


def read_profile(path: Path) -> list[tuple[float, Link]]:
    """The (share, link) entries of a profile file, in order.

    Raises:
        ValueError: one line saying what is wrong with the file.
    """
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"link profile {path}: {exc}") from exc
    entries = document.get("links")
    if not isinstance(entries, list) or not entries or set(document) != {"links"}:
        raise ValueError(f"link profile {path}: expected [[links]] tables, each with share "
                         "and link")
    profile = []
    for entry in entries:
        share, link = entry.get("share"), entry.get("link")
        if (set(entry) != {"share", "link"} or not isinstance(share, int | float)
                or not 0 < share <= 1 or not isinstance(link, str)):
            raise ValueError(f"link profile {path}: each [[links]] needs share (0 < share <= 1) "
                             f"and link (a string), got {entry}")
        profile.append((float(share), Link.parse(link)))
    if sum(share for share, _ in profile) > 1 + 1e-9:
        raise ValueError(f"link profile {path}: the shares add up to more than 1")
    return profile


def assign_links(peers: int, default: Link | None, profile: Sequence[tuple[float, Link]],
                 seed: int) -> list[Link | None]:
    """Each peer's link (None: no proxy): each profile entry takes round(share * peers) peers,
    drawn by `seed`; the rest get `default`."""
    order = list(range(peers))
    random.Random(seed).shuffle(order)
    links: list[Link | None] = [default] * peers
    taken = 0
    for share, link in profile:
        count = min(round(share * peers), peers - taken)
        for index in order[taken:taken + count]:
            links[index] = link
        taken += count
    return links


class LinkedSwarm:
    """The proxies of the linked peers of one simulation, in a nursery of the caller's."""

    def __init__(self, proxies: dict[int, LinkProxy]) -> None:
        self.proxies = proxies

    def configure(self, index: int, config: PeerConfig) -> PeerConfig:
        """`config` announcing its proxy's address, if peer `index` is linked."""
        proxy = self.proxies.get(index)
        if proxy is None:
            return config
        network = dataclasses.replace(config.network, announce=(proxy.multiaddr,))
        return dataclasses.replace(config, network=network)

    def bootstrap_address(self, index: int, address: str) -> str:
        """Where others reach peer `index`, which listens at `address` (with /p2p/<id>)."""
        proxy = self.proxies.get(index)
        if proxy is None:
            return address
        return f"{proxy.multiaddr}/p2p/{address.partition('/p2p/')[2]}"

    def statistics(self) -> list[dict[str, Any]]:
        """Per linked peer: its link and what its proxy carried."""
        return [{"peer": index, "link": str(proxy.link),
                 **dataclasses.asdict(proxy.statistics())}
                for index, proxy in sorted(self.proxies.items())]


@contextlib.asynccontextmanager
async def linked_swarm(links: Sequence[str], folders: Sequence[Path],
                       seed: int) -> AsyncIterator[LinkedSwarm]:
    """Start a proxy for each peer with a link ("" or a missing entry: none).

    Stale status.json files are removed first: a proxy reading one would forward to a port of
    an earlier run.
    """
    async with trio.open_nursery() as nursery:
        proxies = {}
        for index, text in enumerate(links):
            if not text:
                continue
            (folders[index] / "status.json").unlink(missing_ok=True)
            proxy = LinkProxy(Link.parse(text), _listener_of(folders[index]), seed=seed + index)
            proxies[index] = await nursery.start(proxy.run)
        yield LinkedSwarm(proxies)
        nursery.cancel_scope.cancel()


def _listener_of(folder: Path) -> Any:
    async def target() -> tuple[str, int]:
        while True:
            with contextlib.suppress(OSError, ValueError, KeyError, IndexError):
                address = json.loads((folder / "status.json").read_text())["listen_addrs"][0]
                parts = address.split("/")  # /ip4/127.0.0.1/tcp/PORT/p2p/ID
                return parts[2], int(parts[4])
            await trio.sleep(STATUS_POLL_S)

    return target

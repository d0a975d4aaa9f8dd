"""Real `loraswarm peer` daemons in the NAT lab: a public peer and peers behind home NATs.

Every test skips, with the reason, where the lab cannot be built (not root, no nftables).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from testbed.natlab import NatLab, Node, lab_unavailable
from tests.conftest import write_jsonl

ROOT = Path(__file__).resolve().parent.parent
PORT = 4001
pytestmark = pytest.mark.slow


@pytest.fixture
def lab(request: pytest.FixtureRequest) -> Iterator[NatLab]:
    reason = lab_unavailable()
    if reason:
        pytest.skip(reason)
    publics = getattr(request, "param", 1)
    with NatLab(publics=publics, homes=2) as built:
        yield built


class Daemon:
    """A `loraswarm peer` process in a lab namespace, and its status.json."""

    def __init__(self, lab: NatLab, node: Node, folder: Path, model: Path, *extra: str) -> None:
        self.folder = folder
        train = write_jsonl(folder.with_suffix(".jsonl"),
                            [{"text": f"{folder.name} line {j} of text"} for j in range(8)])
        argv = [sys.executable, "-m", "peer.cli", "-v", "peer", "--data-dir", str(folder),
                "--train", str(train), "--model", str(model), "--steps-per-round", "1",
                "--batch-size", "2", "--seq-len", "24", "--threads", "1", "--round-pause", "0.3",
                "--listen", f"/ip4/0.0.0.0/tcp/{PORT}", *extra]
        self.log = folder.with_suffix(".log")
        with self.log.open("wb") as log:
            self.proc = lab.popen(node, argv, stdout=log, stderr=log,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)})

    def status(self) -> dict:
        path = self.folder / "status.json"
        try:
            return json.loads(path.read_text()) if path.is_file() else {}
        except json.JSONDecodeError:  # caught mid-rename on a slow disk: read it next time
            return {}


def wait_for(predicate: Callable[[], bool], what: str, daemons: list[Daemon],
             timeout_s: float = 240.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        for daemon in daemons:
            if daemon.proc.poll() is not None:
                tail = daemon.log.read_text()[-3000:]
                raise AssertionError(f"{daemon.folder.name} exited waiting for {what}:\n{tail}")
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_the_swarm_finds_the_public_peer_public_and_the_natted_ones_private(
        lab: NatLab, tmp_path: Path, small_model_dir: Path) -> None:
    public = Daemon(lab, lab.publics[0], tmp_path / "public", small_model_dir)
    wait_for(lambda: bool(public.status().get("listen_addrs")), "the public peer", [public])
    boot = public.status()["listen_addrs"][0]
    # The 0.0.0.0 listener is listed at its interface's address, loopback last.
    assert boot.startswith(f"/ip4/{lab.publics[0].addr}/tcp/{PORT}/p2p/"), boot
    homes = [Daemon(lab, home, tmp_path / f"home{i}", small_model_dir, "--bootstrap", boot)
             for i, home in enumerate(lab.homes)]
    daemons = [public, *homes]

    def probed() -> bool:
        return all(d.status().get("reachability", {}).get("status", "unknown") != "unknown"
                   for d in daemons)

    wait_for(probed, "every peer's reachability", daemons)
    seen = public.status()["reachability"]
    assert seen["status"] == "public", seen
    for daemon, home in zip(homes, lab.homes, strict=True):
        found = daemon.status()["reachability"]
        assert found["status"] == "private", found
        assert f"at {home.router_addr} port {PORT}" in found["why"], found
    # Behind their NATs the homes still merge with the public peer, which fetches from them
    # over the connections they opened.
    wait_for(lambda: all(d.status().get("merges", 0) >= 1 for d in daemons), "merges", daemons)


def test_two_peers_behind_different_nats_merge_through_the_public_peers_relay(
        lab: NatLab, tmp_path: Path, small_model_dir: Path) -> None:
    public = Daemon(lab, lab.publics[0], tmp_path / "public", small_model_dir)
    wait_for(lambda: bool(public.status().get("listen_addrs")), "the public peer", [public])
    boot = public.status()["listen_addrs"][0]
    homes = [Daemon(lab, home, tmp_path / f"home{i}", small_model_dir, "--bootstrap", boot)
             for i, home in enumerate(lab.homes)]
    daemons = [public, *homes]
    ids = [d.status().get("peer_id") for d in daemons]

    def fetched_from_each_other() -> bool:
        statuses = [h.status() for h in homes]
        if not all(s.get("peer_id") for s in statuses):
            return False
        other = [statuses[1]["peer_id"], statuses[0]["peer_id"]]
        return all(s.get("links", {}).get(o, {}).get("transfers", 0) >= 1
                   for s, o in zip(statuses, other, strict=True))

    wait_for(fetched_from_each_other, "the homes to fetch each other's adapters", daemons)
    public_id = ids[0] or public.status()["peer_id"]
    for home in homes:
        relay = home.status()["relay"]
        assert public_id in relay["reservations"], relay
        assert all(f"/p2p/{public_id}/p2p-circuit/" in a for a in relay["circuit_addrs"])
        assert relay["relayed_dials"].get("ok", 0) >= 1, relay
    assert public.status()["relay"]["held_here"] == 2
    wait_for(lambda: all(d.status().get("merges", 0) >= 2 for d in homes), "merges", daemons)


def transfers(daemon: Daemon, peer: str) -> int:
    return int(daemon.status().get("links", {}).get(peer, {}).get("transfers", 0))


@pytest.mark.parametrize("lab", [3], indirect=True)
def test_a_private_peer_whose_relay_dies_reserves_on_another_and_the_swarm_goes_on(
        lab: NatLab, tmp_path: Path, small_model_dir: Path) -> None:
    publics = [Daemon(lab, lab.publics[0], tmp_path / "public0", small_model_dir)]
    wait_for(lambda: bool(publics[0].status().get("listen_addrs")), "the first public peer",
             publics)
    boot = publics[0].status()["listen_addrs"][0]
    publics += [Daemon(lab, node, tmp_path / f"public{i}", small_model_dir, "--bootstrap", boot)
                for i, node in enumerate(lab.publics[1:], start=1)]
    homes = [Daemon(lab, home, tmp_path / f"home{i}", small_model_dir, "--bootstrap", boot)
             for i, home in enumerate(lab.homes)]
    daemons = [*publics, *homes]
    wait_for(lambda: all(len(h.status().get("relay", {}).get("reservations", {})) == 2
                         for h in homes), "each home to hold two relay slots", daemons)
    ids = [h.status()["peer_id"] for h in homes]
    wait_for(lambda: transfers(homes[0], ids[1]) >= 1 and transfers(homes[1], ids[0]) >= 1,
             "the homes to fetch from each other", daemons)
    # Kill a relay both homes hold a slot on, as the swarm runs.
    held = [set(h.status()["relay"]["reservations"]) for h in homes]
    dead = next(p for p in publics if p.status()["peer_id"] in held[0] & held[1])
    dead_id = dead.status()["peer_id"]
    dead.proc.kill()
    dead.proc.wait(timeout=10)
    alive = [d for d in daemons if d is not dead]

    def moved() -> bool:
        relays = [h.status().get("relay", {}) for h in homes]
        return all(len(r.get("reservations", {})) == 2 and dead_id not in r["reservations"]
                   for r in relays)

    wait_for(moved, "the homes to reserve on the remaining relays", alive)
    for home in homes:
        relay = home.status()["relay"]
        assert relay["lost"] >= 1 and relay["reserved"] >= 3, relay
        assert not any(dead_id in a for a in relay["circuit_addrs"]), relay
    before = [transfers(homes[0], ids[1]), transfers(homes[1], ids[0])]
    wait_for(lambda: transfers(homes[0], ids[1]) > before[0]
             and transfers(homes[1], ids[0]) > before[1],
             "the homes to fetch from each other again", alive)

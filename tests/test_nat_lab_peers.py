"""Real `loraswarm peer` daemons in the NAT lab: a public peer and peers behind home NATs.

Every test fails, naming the fix, where the lab cannot be built (not root, no nftables).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.labpeers import PORT, Daemon, wait_for
from testbed.natlab import NatLab, lab_unavailable
from tests.conftest import require

# Hole punches need both sides to act within a round trip: alone, not beside another worker.
pytestmark = [pytest.mark.slow, pytest.mark.serial]


@pytest.fixture
def lab(request: pytest.FixtureRequest) -> Iterator[NatLab]:
    require(lab_unavailable())
    shape = {"publics": 1, "stealth": False, **getattr(request, "param", {})}
    with NatLab(homes=2, **shape) as built:
        yield built


def test_two_peers_behind_different_nats_merge_through_the_public_peers_relay(
        lab: NatLab, tmp_path: Path, small_model_dir: Path) -> None:
    """The swarm finds the public peer public and the others private; the two private ones
    merge through the relay. The lab's routers answer unsolicited packets with a reset, which
    defeats every hole punch (the next test's routers drop them, and punches work)."""
    public = Daemon(lab, lab.publics[0], tmp_path / "public", small_model_dir)
    wait_for(lambda: bool(public.status().get("listen_addrs")), "the public peer", [public])
    boot = public.status()["listen_addrs"][0]
    # The 0.0.0.0 listener is listed at its interface's address, loopback last.
    assert boot.startswith(f"/ip4/{lab.publics[0].addr}/tcp/{PORT}/p2p/"), boot
    homes = [Daemon(lab, home, tmp_path / f"home{i}", small_model_dir, "--bootstrap", boot)
             for i, home in enumerate(lab.homes)]
    daemons = [public, *homes]
    ids = [d.status().get("peer_id") for d in daemons]

    def probed() -> bool:
        return all(d.status().get("reachability", {}).get("status", "unknown") != "unknown"
                   for d in daemons)

    wait_for(probed, "every peer's reachability", daemons)
    assert public.status()["reachability"]["status"] == "public", public.status()
    for daemon, home in zip(homes, lab.homes, strict=True):
        found = daemon.status()["reachability"]
        assert found["status"] == "private", found
        assert f"at {home.router_addr} port {PORT}" in found["why"], found

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
    assert public.status()["relay"]["held_here"] == 2
    # A home that dialled the other through the relay tried to punch a hole (the other may
    # have fetched back over that same connection, without a dial of its own).
    relays = [h.status()["relay"] for h in homes]
    assert sum(r["relayed_dials"].get("ok", 0) for r in relays) >= 1, relays
    punched = [r["holepunch"] for r in relays]
    assert sum(p.get("attempts", 0) for p in punched) >= 1, punched
    assert not any(p.get("successes", 0) for p in punched), punched
    wait_for(lambda: all(d.status().get("merges", 0) >= 2 for d in homes), "merges", daemons)


def transfers(daemon: Daemon, peer: str) -> int:
    return int(daemon.status().get("links", {}).get(peer, {}).get("transfers", 0))


@pytest.mark.parametrize("lab", [{"publics": 3, "stealth": True}], indirect=True)
def test_behind_stealth_routers_holes_are_punched_and_a_dead_relay_is_replaced(
        lab: NatLab, tmp_path: Path, small_model_dir: Path) -> None:
    """Routers that drop unsolicited packets, as most home routers do, let hole punches
    through; a relay killed as the swarm runs is replaced by another, and the swarm goes on."""
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
    punched = [h.status()["relay"]["holepunch"] for h in homes]
    assert sum(p.get("successes", 0) for p in punched) >= 1, punched
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

"""Private swarms: a libp2p pre-shared key (`--swarm-key FILE`) keeps everyone else out."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import pytest
import trio

from gossip.config import NodeConfig
from gossip.errors import GossipError
from gossip.keyfile import read_swarm_key, write_swarm_key
from gossip.membership import Membership
from gossip.node import GossipNode
from testbed.loopback import LOOPBACK_SWARM
from topology.config import TopologyConfig

DIAL_TIMEOUT_S = 2.0


def _node(psk: str | None, *bootstrap: str) -> GossipNode:
    config = NodeConfig(psk=psk, bootstrap=bootstrap, dial_timeout_s=DIAL_TIMEOUT_S)
    return GossipNode(config, LOOPBACK_SWARM, identity_dir=None)


async def test_only_peers_holding_the_swarm_key_can_connect(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="gossip.membership")
    key = write_swarm_key(tmp_path / "swarm.key")
    assert read_swarm_key(tmp_path / "swarm.key") == key
    wrong = write_swarm_key(tmp_path / "other.key")
    first = _node(key)
    failures: dict[str, str] = {}

    async def must_fail(name: str, node: GossipNode) -> None:
        with pytest.raises(GossipError) as caught:
            await node.connect(first.listen_addrs[0])
        failures[name] = str(caught.value)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(first.run)
            member, stranger, keyless = _node(key), _node(wrong), _node(None)
            for node in (member, stranger, keyless):
                await nursery.start(node.run)
            # A joiner with the right key, through the membership service as the daemon joins.
            joiner = _node(key, first.listen_addrs[0])
            membership = Membership(joiner, TopologyConfig(), random.Random(0))
            await nursery.start(joiner.run)
            await nursery.start(membership.run)
            # A joiner with the wrong key: it keeps retrying and says why it might fail.
            outsider = _node(wrong, first.listen_addrs[0])
            outsider_view = Membership(outsider, TopologyConfig(), random.Random(1))
            await nursery.start(outsider.run)
            await nursery.start(outsider_view.run)

            assert await member.connect(first.listen_addrs[0]) == first.peer_id
            async with trio.open_nursery() as attempts:
                attempts.start_soon(must_fail, "stranger", stranger)
                attempts.start_soon(must_fail, "keyless", keyless)
            await membership.wait_until(lambda: first.peer_id in joiner.connected_peers())
            await outsider_view.wait_until(
                lambda: outsider_view.statistics().bootstrap_failures >= 1
            )
            assert set(first.connected_peers()) == {member.peer_id, joiner.peer_id}
            assert outsider.connected_peers() == []
            nursery.cancel_scope.cancel()
    # Usually the dial hangs until its timeout; under load the remote may hang up first.
    assert "swarm-key" in failures["stranger"], failures["stranger"]
    assert "private swarm" in failures["keyless"], failures["keyless"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("cannot reach the swarm" in w and "swarm-key" in w for w in warnings)


def test_the_swarm_key_stays_out_of_repr() -> None:
    key = "ab" * 32
    config = NodeConfig(psk=key)
    assert key not in repr(config) and "psk" not in repr(config)
    assert config.psk == key

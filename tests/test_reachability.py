"""Reachability: listen addresses on 0.0.0.0, the dial-back protocol and the neighbours' vote.

Real libp2p hosts on 127.0.0.1; the NAT lab's version (private peers behind masquerading
routers) is in tests/test_nat_lab_peers.py.
"""

from __future__ import annotations

import socket
from functools import partial

import pytest
import trio
from libp2p.peer.id import ID

from gossip.addresses import expand_unspecified, interface_ips
from gossip.dialback import DialbackReply, DialbackRequest, ask_dialback, probe_port
from gossip.errors import WireError
from gossip.node import NodeConfig
from gossip.reachability import PRIVATE, PUBLIC, UNKNOWN, tcp_ports, verdict
from gossip.swarm import PROTOCOL_VERSION
from gossip.wire import MAGIC
from tests.nodes import SWARM, running

KEY = "ab" * 32
ID_ = "12D3KooWCyyd6mNb3wJmvLMsXuvvT5SV4bqEvsvRrUN1p6XQ4yJ9"




def closed_port() -> int:
    """A port nothing listens on (bound and released: the kernel refuses a dial to it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_of(addr: str) -> int:
    parts = addr.split("/")
    return int(parts[parts.index("tcp") + 1])


# -- 0.0.0.0 listeners ------------------------------------------------------------------------


def test_an_unspecified_address_expands_to_every_interface_loopback_last() -> None:
    ips = ["127.0.0.1", "10.0.0.5", "100.64.0.9", "::1", "2001:db8::7"]
    addrs = ["/ip4/0.0.0.0/tcp/4001/p2p/X", "/ip4/192.0.2.1/tcp/9/p2p/X", "/ip6/::/tcp/4002/p2p/X"]
    assert expand_unspecified(addrs, ips) == [
        "/ip4/100.64.0.9/tcp/4001/p2p/X", "/ip4/10.0.0.5/tcp/4001/p2p/X",
        "/ip4/127.0.0.1/tcp/4001/p2p/X", "/ip4/192.0.2.1/tcp/9/p2p/X",
        "/ip6/2001:db8::7/tcp/4002/p2p/X", "/ip6/::1/tcp/4002/p2p/X",
    ]


async def test_a_peer_listening_on_0_0_0_0_is_joined_at_an_address_it_lists() -> None:
    wildcard = NodeConfig(listen=("/ip4/0.0.0.0/tcp/0",))
    async with running(wildcard) as (first,):
        addrs = first.listen_addrs
        assert addrs and not any("/0.0.0.0/" in a for a in addrs)
        assert addrs[-1].startswith("/ip4/127.0.0.1/")  # loopback last
        assert {a.split("/")[2] for a in addrs} <= set(interface_ips())
        async with running(NodeConfig()) as (second,):
            with trio.fail_after(10):
                assert await second.connect(addrs[-1]) == first.peer_id


# -- the dial-back messages -------------------------------------------------------------------


def test_dialback_messages_round_trip() -> None:
    request = DialbackRequest(SWARM, (4001, 4002))
    assert DialbackRequest.from_wire(request.to_wire(), swarm=SWARM) == request
    reply = DialbackReply(SWARM, "ok", "100.64.0.101", ("refused", "ok"))
    assert DialbackReply.from_wire(reply.to_wire(), swarm=SWARM, ports=2) == reply


@pytest.mark.parametrize("ports", [(), (0,), (70000,), (1, 1), (1, 2, 3, 4, 5), ("80",)])
def test_a_hostile_request_is_refused_with_a_reason(ports: tuple) -> None:
    import msgpack
    data = MAGIC + SWARM + msgpack.packb({"kind": "dialback_request", "protocol": PROTOCOL_VERSION,
                                           "ports": list(ports)})
    with pytest.raises(WireError) as caught:
        DialbackRequest.from_wire(data, swarm=SWARM)
    assert caught.value.reason == "bad_field"


def test_a_reply_must_answer_each_port_asked() -> None:
    reply = DialbackReply(SWARM, "ok", "127.0.0.1", ("ok",))
    with pytest.raises(WireError):
        DialbackReply.from_wire(reply.to_wire(), swarm=SWARM, ports=2)
    with pytest.raises(WireError):
        DialbackReply(SWARM, "ok", "127.0.0.1", ("open",))
    with pytest.raises(WireError):
        DialbackReply(SWARM, "rate_limited", "", ("ok",))


# -- probing one port -------------------------------------------------------------------------


@pytest.mark.parametrize("psk", [None, KEY])
async def test_a_probe_recognises_a_libp2p_listener_of_our_network(psk: str | None) -> None:
    async with running(NodeConfig(psk=psk)) as (node,):
        port = port_of(node.listen_addrs[0])
        assert await probe_port("127.0.0.1", port, psk=psk) == "ok"
        other_key = None if psk else KEY  # another network's listener is not ours
        assert await probe_port("127.0.0.1", port, psk=other_key) == "not_libp2p"


async def test_a_probe_tells_refused_from_not_libp2p() -> None:
    assert await probe_port("127.0.0.1", closed_port(), psk=None) == "refused"

    async def greet(stream: trio.SocketStream) -> None:
        await stream.send_all(b"SSH-2.0-OpenSSH_9.2\r\n")

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, greet, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        assert await probe_port("127.0.0.1", port, psk=None) == "not_libp2p"
        nursery.cancel_scope.cancel()


# -- the vote ---------------------------------------------------------------------------------


def test_the_verdict_needs_two_agreeing_neighbours_when_two_answered() -> None:
    assert verdict({"a": "reachable", "b": "reachable", "c": "unreachable"}, [1]).status == PUBLIC
    assert verdict({"a": "unreachable", "b": "unreachable", "c": "reachable"}, [1]).status \
        == PRIVATE
    # One liar among two honest answers does not decide; with one answer, it decides.
    assert verdict({"a": "reachable", "b": "unreachable"}, [1]).status == UNKNOWN
    assert verdict({"a": "unreachable"}, [1]).status == PRIVATE
    assert verdict({"a": "rate_limited", "b": "no_answer"}, [1]).status == UNKNOWN
    assert verdict({}, [1]).status == UNKNOWN
    found = verdict({"a": "unreachable", "b": "unreachable"}, [4001], ["100.64.0.101"])
    assert found.why == "2 of 2 peers could not dial us at 100.64.0.101 port 4001"


def test_relayed_addresses_are_not_asked_for() -> None:
    addrs = [f"/ip4/1.2.3.4/tcp/4001/p2p/{ID_}", f"/ip4/1.2.3.4/tcp/4001/p2p/{ID_}",
             f"/ip4/5.6.7.8/tcp/4002/p2p/R/p2p-circuit/p2p/{ID_}", f"/memory/3/p2p/{ID_}"]
    assert tcp_ports(addrs) == (4001,)


# -- neighbours dial us back ------------------------------------------------------------------


async def test_neighbours_find_a_listening_peer_public() -> None:
    quiet = NodeConfig(reachability_interval_s=0)  # probed by hand below
    async with running(quiet, quiet, quiet) as (others_hub, asker, other):
        others = [others_hub, other]
        with trio.fail_after(30):
            await asker.connect(other.listen_addrs[0])
            found = await asker.probe.probe([o.peer_id for o in others])
        assert found.status == PUBLIC, found
        assert found.answers == {o.peer_id: "reachable" for o in others}
        assert "2 of 2 peers dialled us back at 127.0.0.1" in found.why


async def test_a_peer_announcing_a_port_nobody_listens_on_is_private() -> None:
    # As a peer behind a NAT: it reaches others, and announces an address where none reach it.
    quiet = NodeConfig(reachability_interval_s=0)
    hidden = NodeConfig(reachability_interval_s=0,
                        announce=(f"/ip4/127.0.0.1/tcp/{closed_port()}",))
    async with running(quiet, hidden, quiet) as (first, asker, third):
        with trio.fail_after(30):
            await asker.connect(third.listen_addrs[0])
            found = await asker.probe.probe([first.peer_id, third.peer_id])
        assert found.status == PRIVATE, found
        assert set(found.answers.values()) == {"unreachable"}


async def test_a_second_request_within_the_interval_is_rate_limited_without_a_dial() -> None:
    quiet = NodeConfig(reachability_interval_s=0)
    async with running(quiet, quiet) as (server, client):
        ports = (port_of(client.listen_addrs[0]),)

        async def open_stream():
            return await client.host.new_stream(ID.from_base58(server.peer_id),
                                                ["/loraswarm/dialback/1"])

        with trio.fail_after(30):
            first = await ask_dialback(open_stream, SWARM, ports)
            second = await ask_dialback(open_stream, SWARM, ports)
        assert first.status == "ok" and first.outcomes == ("ok",)
        assert second.status == "rate_limited" and second.outcomes == ()
        assert server.dialback.served == {"ok": 1, "rate_limited": 1}


async def test_a_peer_probes_itself_once_a_neighbour_is_connected() -> None:
    async with running(NodeConfig(), NodeConfig()) as (first, second):
        with trio.fail_after(30):
            await second.probe.probed.wait()
        assert second.reachability.status == PUBLIC
        assert second.reachability.to_status()["answers"] == {first.peer_id: "reachable"}

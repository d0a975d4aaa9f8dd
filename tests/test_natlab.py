"""The NAT lab behaves like the internet with home NATs: small socket programs in namespaces.

Every test fails, naming the fix, where namespaces cannot be made (not root, no nftables).
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from testbed.natlab import NatLab, NatLabError, Node, lab_unavailable, netns_names, remove_stale
from tests.conftest import require

LINE_TIMEOUT_S = 5.0
BLOCKED_TIMEOUT_S = 1.5  # a connection that should not get through gives up after this

# argv: host port. Accepts one connection, tells the client its address as seen here.
SERVER = """
import socket, sys
with socket.create_server((sys.argv[1], int(sys.argv[2]))) as server:
    server.settimeout(20)
    print("ready", server.getsockname()[1], flush=True)
    conn, peer = server.accept()
    with conn:
        print("peer", *peer, flush=True)
        conn.sendall(f"seen {peer[0]}\\n".encode())
"""

# argv: host port. Passes one line from the first client it accepts to the second.
RELAY = """
import socket, sys
with socket.create_server((sys.argv[1], int(sys.argv[2]))) as server:
    server.settimeout(20)
    print("ready", server.getsockname()[1], flush=True)
    first, first_peer = server.accept()
    second, second_peer = server.accept()
    with first, second:
        second.sendall(first.makefile("rb").readline())
        print("relayed", first_peer[0], second_peer[0], flush=True)
"""

# argv: host port timeout [line]. Connects, sends the line if given, prints the line it gets.
CLIENT = """
import errno, socket, sys
try:
    conn = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
except ConnectionRefusedError:
    sys.exit(print("refused", flush=True))
except TimeoutError:
    sys.exit(print("timeout", flush=True))
except OSError as exc:
    sys.exit(print("unreachable", errno.errorcode.get(exc.errno, exc.errno), flush=True))
with conn:
    print("connected", *conn.getsockname(), flush=True)
    conn.settimeout(10)
    if len(sys.argv) > 4:
        conn.sendall(sys.argv[4].encode() + b"\\n")
    print("received", conn.makefile().readline().strip(), flush=True)
"""


@pytest.fixture(scope="module")
def lab() -> Iterator[NatLab]:
    require(lab_unavailable())
    with NatLab(publics=2, homes=2) as lab:
        yield lab


def _start(lab: NatLab, node: Node, script: str, *args: object) -> subprocess.Popen[str]:
    return lab.popen(node, [sys.executable, "-c", script, *map(str, args)],
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _next_line(proc: subprocess.Popen[str], timeout_s: float = LINE_TIMEOUT_S) -> list[str]:
    """The words of the next line `proc` prints; a byte at a time, so nothing is read ahead."""
    assert proc.stdout is not None
    fd, line = proc.stdout.fileno(), b""
    deadline = time.monotonic() + timeout_s
    while not line.endswith(b"\n"):
        if not select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
            raise TimeoutError(f"no line from {proc.args!r} in {timeout_s} s (so far {line!r})")
        byte = os.read(fd, 1)
        if not byte:
            _, err = proc.communicate(timeout=LINE_TIMEOUT_S)
            raise EOFError(f"{proc.args!r} exited ({proc.returncode}) after {line!r}: {err}")
        line += byte
    return line.decode().split()


def _rest(proc: subprocess.Popen[str]) -> list[list[str]]:
    """The words of every remaining line, once `proc` has exited; it must exit cleanly."""
    out, err = proc.communicate(timeout=LINE_TIMEOUT_S)
    assert proc.returncode == 0, err
    return [line.split() for line in out.splitlines()]


def _connect(lab: NatLab, node: Node, host: str, port: int, *line: str) -> list[list[str]]:
    """Run the client to the end: its outcome line, then what it received, if it connected."""
    return _rest(_start(lab, node, CLIENT, host, port, BLOCKED_TIMEOUT_S, *line))


@contextlib.contextmanager
def _serving(lab: NatLab, node: Node, script: str,
             port: int = 0) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """A server listening in `node` (on every address) and its port; stopped on the way out."""
    proc = _start(lab, node, script, "0.0.0.0", port)
    try:
        word, bound = _next_line(proc)
        assert word == "ready"
        yield proc, int(bound)
    finally:
        proc.kill()
        proc.communicate(timeout=LINE_TIMEOUT_S)


@pytest.mark.slow
def test_home_host_is_seen_from_its_routers_public_address(lab: NatLab) -> None:
    home, public = lab.homes[0], lab.publics[0]
    with _serving(lab, public, SERVER) as (server, port):
        outcome, received = _connect(lab, home, public.addr, port)
        assert outcome[:2] == ["connected", home.addr]
        assert received == ["received", "seen", home.router_addr]  # masqueraded
        assert _rest(server)[0][:2] == ["peer", home.router_addr]


@pytest.mark.slow
def test_home_host_is_reachable_only_through_a_forwarded_port(lab: NatLab) -> None:
    home, public = lab.homes[1], lab.publics[1]
    with _serving(lab, home, SERVER, port=4101) as (server, port):
        assert _connect(lab, public, home.router_addr, port) == [["refused"]]
        assert _connect(lab, public, home.addr, port)[0][0] == "unreachable"  # no route to a LAN
        lab.forward(home, port)
        outcome, received = _connect(lab, public, home.router_addr, port)
        assert outcome[:2] == ["connected", public.addr]
        assert received == ["received", "seen", public.addr]  # DNAT only: the real source
        assert _rest(server)[0][:2] == ["peer", public.addr]


@pytest.mark.slow
def test_a_stealthy_router_drops_what_a_plain_one_refuses() -> None:
    require(lab_unavailable())
    with NatLab(publics=1, homes=1, stealth=True) as quiet:
        home, public = quiet.homes[0], quiet.publics[0]
        with _serving(quiet, home, SERVER, port=4102) as (server, port):
            assert _connect(quiet, public, home.router_addr, port) == [["timeout"]]
            quiet.forward(home, port)  # a forwarded port still gets through
            assert _connect(quiet, public, home.router_addr, port)[0][0] == "connected"
        with _serving(quiet, public, SERVER) as (server, port):  # and replies still come back
            assert _connect(quiet, home, public.addr, port)[0][:2] == ["connected", home.addr]


@pytest.mark.slow
def test_homes_reach_each_other_only_through_public_hosts(lab: NatLab) -> None:
    one, other, public = lab.homes[0], lab.homes[1], lab.publics[0]
    with _serving(lab, other, SERVER) as (_, port):
        for target in (other.addr, other.gateway):  # the other LAN, from the LAN side
            assert _connect(lab, one, target, port)[0][0] in ("unreachable", "timeout")
        assert _connect(lab, one, other.router_addr, port) == [["refused"]]
    with _serving(lab, public, RELAY) as (relay, port):
        sender = _start(lab, one, CLIENT, public.addr, port, LINE_TIMEOUT_S, "hello")
        assert _next_line(sender)[0] == "connected"  # accepted first: the relay's sender
        assert _connect(lab, other, public.addr, port)[1] == ["received", "hello"]
        assert _rest(relay) == [["relayed", one.router_addr, other.router_addr]]
        assert _rest(sender) == [["received"]]


@pytest.mark.slow
def test_teardown_removes_every_namespace_and_process() -> None:
    require(lab_unavailable())
    lab = NatLab(publics=1, homes=1)
    with pytest.raises(RuntimeError, match="the body failed"), lab:
        created = set(lab.namespaces)
        assert len(created) == 4 and created <= set(netns_names())
        sleeper = lab.popen(lab.homes[0], [sys.executable, "-c", "import time; time.sleep(60)"])
        raise RuntimeError("the body failed")
    assert not created & set(netns_names())
    assert sleeper.returncode is not None


@pytest.mark.slow
def test_teardown_after_setup_fails_half_way(monkeypatch: pytest.MonkeyPatch) -> None:
    require(lab_unavailable())

    def fail(self: NatLab, i: int, home: object) -> None:
        raise NatLabError("setup failed half-way")

    monkeypatch.setattr(NatLab, "_build_home", fail)
    lab = NatLab(publics=1, homes=2)
    with pytest.raises(NatLabError, match="half-way"), lab:
        pass
    assert not [name for name in netns_names() if name.startswith(lab.prefix)]


@pytest.mark.slow
def test_a_failed_command_names_itself_and_its_stderr(lab: NatLab) -> None:
    with pytest.raises(NatLabError, match=r"`ip netns exec \S+ ip link set nosuch up`.*nosuch"):
        lab.run(lab.publics[0], ["ip", "link", "set", "nosuch", "up"])


@pytest.mark.slow
def test_remove_stale_deletes_namespaces_of_dead_labs_only() -> None:
    require(lab_unavailable())
    names = [f"lsw-{pid}-test-net" for pid in (_dead_pid(), os.getpid())]
    for name in names:
        subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    try:
        removed = remove_stale()
        assert names[0] in removed and names[1] not in removed
        assert set(netns_names()) & set(names) == {names[1]}
    finally:
        for name in set(netns_names()) & set(names):
            subprocess.run(["ip", "netns", "del", name], check=True, timeout=10)


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait(timeout=10)
    return proc.pid

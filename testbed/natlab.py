"""A NAT lab: public hosts, and home hosts behind NAT routers, in Linux network namespaces.

Loopback cannot show what NATs do to a swarm (who can dial whom, which address a peer is seen
from), so a `NatLab` builds a small internet out of network namespaces, as root:

    public host p<i>:  eth0 100.64.0.<10+i>  --+
                                               +-- "internet": a bridge in its own namespace
    router r<i>:       wan0 100.64.0.<101+i> --+
    router r<i>:       lan0 10.0.<i+1>.1  ---  home host h<i>: eth0 10.0.<i+1>.2, default via .1

The internet is 100.64.0.0/24, RFC 6598's shared address space, on purpose: Python's
`ipaddress` calls it neither private nor global, so `gossip.addresses.address_scope` classifies
it "public" and peers dial it without --allow-private-addrs, as they dial real public addresses,
while the 10.0.x LANs stay "private", as home LANs are. (It is also why miniupnpd cannot run on
these routers: it counts 100.64.0.0/10 as reserved and refuses to map ports behind it.)

Each router forwards, and masquerades its LAN behind its WAN address with nftables and
connection tracking, so replies come back; its forward chain drops anything from the WAN that is
neither such a reply nor a port opened with `NatLab.forward`. Public hosts route only the
internet and routers have no default route, so nobody reaches a home LAN directly, and homes
reach each other only through public hosts or forwarded ports. As in most home routers, Linux
masquerade keeps a connection's source port when it is free, and lets in only replies from the
address and port that connection went to.

Nothing outside the lab's namespaces is touched: every address lives inside them, and every
`ip` command runs in the namespace it changes (`ip -n`), each veth created there with its other
end moved straight into its peer namespace.

    with NatLab(publics=1, homes=2) as lab:
        lab.forward(lab.homes[0], 4001)  # router_addr:4001 -> the home host's :4001
        proc = lab.popen(lab.homes[1], [sys.executable, "client.py", lab.homes[0].router_addr])
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["Home", "NatLab", "NatLabError", "Node", "lab_unavailable", "netns_names",
           "remove_stale"]

PREFIX = "lsw-"  # every namespace a lab creates is named lsw-<pid>-<lab number>-<role>
COMMAND_TIMEOUT_S = 10.0  # one `ip` or `nft` command; they take milliseconds
STOP_TIMEOUT_S = 1.5  # for the processes `popen` started to exit after SIGTERM, all together
INTERNET = "100.64.0"  # /24; public hosts from .10, routers from .101
MAX_PUBLICS = 90
MAX_HOMES = 154

_STALE = re.compile(rf"^{PREFIX}(\d+)-")
_COUNTER = itertools.count()

# The router's whole firewall: masquerade outbound; forward replies, outbound and DNAT only.
_ROUTER_RULES = """
table ip nat {
    chain prerouting { type nat hook prerouting priority dstnat; policy accept; }
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        oifname "wan0" masquerade
    }
}
table ip filter {
    chain forward {
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        iifname "lan0" oifname "wan0" accept
        ct status dnat accept
    }
}
"""


# A "stealth" router, as most home routers are: what arrives on the WAN side for no connection
# of its own is dropped without an answer. The plain router answers a SYN to a closed port with
# a reset, and that reset kills TCP hole punching: the first SYN of a simultaneous open always
# meets the other router before that router's own SYN has opened the way (no delay in the lab),
# and its reset also closes the sender's mapping (measured: 0 of 5 punches; 5 of 5 stealthy).
_STEALTH_RULES = """
table ip stealth {
    chain input {
        type filter hook input priority filter; policy accept;
        iifname "wan0" ct state established,related accept
        iifname "wan0" drop
    }
}
"""


class NatLabError(RuntimeError):
    """A command that builds or drives the lab failed; the message names it and its stderr."""


@dataclass(frozen=True)
class Node:
    """One namespace of the lab and its address on the internet (a router's: its WAN side)."""

    netns: str
    addr: str


@dataclass(frozen=True)
class Home(Node):
    """A host behind a NAT router: `addr` is its LAN address, `router.addr` the NAT's public IP."""

    router: Node
    gateway: str  # the router's LAN address, the host's default route

    @property
    def router_addr(self) -> str:
        return self.router.addr


def _run(argv: list[str], *, input: str | None = None,
         timeout_s: float = COMMAND_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """Run `argv` to completion; raise NatLabError naming it if it fails or overruns."""
    command = shlex.join(argv)
    try:
        done = subprocess.run(argv, input=input, capture_output=True, text=True,
                              timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        raise NatLabError(f"`{command}` did not finish in {timeout_s:g} s") from exc
    except OSError as exc:
        raise NatLabError(f"`{command}` could not start: {exc}") from exc
    if done.returncode != 0:
        raise NatLabError(f"`{command}` failed (exit {done.returncode}): "
                          f"{done.stderr.strip() or '(no stderr)'}")
    return done


def _ip(netns: str, *args: str) -> None:
    _run(["ip", "-n", netns, *args])


def _exec(netns: str, argv: list[str], *, input: str | None = None) -> None:
    _run(["ip", "netns", "exec", netns, *argv], input=input)


def netns_names() -> list[str]:
    """The names of every network namespace `ip netns` knows, the lab's and others'."""
    lines = _run(["ip", "netns", "list"]).stdout.splitlines()
    return [line.split()[0] for line in lines if line.strip()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale() -> list[str]:
    """Delete the lab namespaces whose creating process is gone; returns their names.

    A lab that was killed (SIGKILL, a crashed CI job) leaves its namespaces behind; their
    names carry the creator's pid, so a later lab can tell them from a live lab's.
    """
    stale = [name for name in netns_names()
             if (match := _STALE.match(name)) and not _alive(int(match.group(1)))]
    for name in stale:
        _run(["ip", "netns", "del", name])
        logger.info("removed stale lab namespace %s", name)
    return stale


@functools.cache
def lab_unavailable() -> str | None:
    """Why a NatLab cannot run here (tests fail with it), or None where it can."""
    if not sys.platform.startswith("linux"):
        return "the NAT lab needs Linux network namespaces"
    if os.geteuid() != 0:
        return "the NAT lab needs root (ip netns add)"
    for tool, package in (("ip", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            return f"the NAT lab needs `{tool}`: apt-get install {package}"
    probe = f"{PREFIX}{os.getpid()}-probe"
    try:
        _run(["ip", "netns", "add", probe])
        try:  # the binary may be there without the kernel's nf_tables, NAT or conntrack
            _exec(probe, ["nft", "-f", "-"], input=_ROUTER_RULES)
        finally:
            _run(["ip", "netns", "del", probe])
    except NatLabError as exc:
        return f"cannot build a NAT lab here: {exc}"
    return None


class NatLab:
    """The namespaces, links and NATs of one lab; a context manager that builds and removes them.

    Args:
        publics: how many public hosts, at 100.64.0.10, .11, ...
        homes: how many homes (a router and a host behind it), routers at 100.64.0.101, ...
    """

    def __init__(self, publics: int = 1, homes: int = 1, *, stealth: bool = False,
                 internet: str = INTERNET) -> None:
        if not (0 <= publics <= MAX_PUBLICS and 0 <= homes <= MAX_HOMES):
            raise ValueError(f"a lab holds 0..{MAX_PUBLICS} public hosts and 0..{MAX_HOMES} "
                             f"homes, not {publics} and {homes}")
        self.prefix = f"{PREFIX}{os.getpid()}-{next(_COUNTER)}-"
        self.internet = self.prefix + "net"
        # `internet`: the first three octets of its /24; only UPnP needs another than
        # 100.64.0 (`testbed.upnplab`: miniupnpd will not map behind a shared address)
        self.publics = [Node(f"{self.prefix}p{i}", f"{internet}.{10 + i}")
                        for i in range(publics)]
        self.homes = [Home(f"{self.prefix}h{i}", f"10.0.{i + 1}.2",
                           router=Node(f"{self.prefix}r{i}", f"{internet}.{101 + i}"),
                           gateway=f"10.0.{i + 1}.1")
                      for i in range(homes)]
        self.stealth = stealth  # routers drop unsolicited WAN traffic instead of resetting it
        self._created: list[str] = []  # namespaces, in order of creation
        self._processes: list[subprocess.Popen[Any]] = []

    @property
    def namespaces(self) -> tuple[str, ...]:
        """The namespaces this lab has created and not yet deleted."""
        return tuple(self._created)

    def __enter__(self) -> NatLab:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _build(self) -> None:
        started = time.monotonic()
        remove_stale()
        routers = [home.router for home in self.homes]
        for netns in [self.internet, *(n.netns for n in [*self.publics, *routers, *self.homes])]:
            _run(["ip", "netns", "add", netns])
            self._created.append(netns)
            _ip(netns, "link", "set", "lo", "up")
        _ip(self.internet, "link", "add", "br0", "type", "bridge")
        _ip(self.internet, "link", "set", "br0", "up")
        for i, public in enumerate(self.publics):
            self._plug(public.netns, "eth0", f"p{i}", public.addr)
        for i, home in enumerate(self.homes):
            self._build_home(i, home)
        logger.info("NAT lab %s: %d public hosts, %d homes, built in %.2f s", self.prefix,
                    len(self.publics), len(self.homes), time.monotonic() - started)

    def _plug(self, netns: str, name: str, port: str, addr: str) -> None:
        """Connect `netns` to the internet: interface `name` there, `port` on the bridge."""
        _ip(netns, "link", "add", name, "type", "veth", "peer", "name", port,
            "netns", self.internet)
        _ip(self.internet, "link", "set", port, "master", "br0", "up")
        _ip(netns, "addr", "add", f"{addr}/24", "dev", name)
        _ip(netns, "link", "set", name, "up")

    def _build_home(self, i: int, home: Home) -> None:
        router = home.router.netns
        self._plug(router, "wan0", f"r{i}", home.router_addr)
        _ip(router, "link", "add", "lan0", "type", "veth", "peer", "name", "eth0",
            "netns", home.netns)
        _ip(router, "addr", "add", f"{home.gateway}/24", "dev", "lan0")
        _ip(router, "link", "set", "lan0", "up")
        _ip(home.netns, "addr", "add", f"{home.addr}/24", "dev", "eth0")
        _ip(home.netns, "link", "set", "eth0", "up")
        _ip(home.netns, "route", "add", "default", "via", home.gateway)
        _exec(router, ["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        _exec(router, ["nft", "-f", "-"], input=_ROUTER_RULES)
        if self.stealth:
            _exec(router, ["nft", "-f", "-"], input=_STEALTH_RULES)

    def forward(self, home: Home, port: int, *, proto: str = "tcp") -> None:
        """Forward `port` on the home's router (its WAN address) to the same port on its host."""
        if home not in self.homes:
            raise ValueError(f"{home.netns} is not a home of lab {self.prefix}")
        if not 0 < port < 65536 or proto not in ("tcp", "udp"):
            raise ValueError(f"cannot forward {proto} port {port}: need tcp or udp, 1..65535")
        self._require(home)
        _exec(home.router.netns, ["nft", "add", "rule", "ip", "nat", "prerouting",
                                  "iifname", "wan0", proto, "dport", str(port),
                                  "dnat", "to", f"{home.addr}:{port}"])

    def popen(self, node: Node, argv: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start `argv` inside `node`'s namespace; `kwargs` go to `subprocess.Popen`.

        The process gets its own session, so that `close` stops it and its children.
        """
        self._require(node)
        kwargs["start_new_session"] = True
        proc = subprocess.Popen(["ip", "netns", "exec", node.netns, *argv], **kwargs)
        self._processes.append(proc)
        return proc

    def run(self, node: Node, argv: list[str], *, input: str | None = None,
            timeout_s: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run `argv` inside `node`'s namespace to completion; its captured output.

        Raises:
            NatLabError: it failed or did not finish in `timeout_s`; the message has its stderr.
        """
        self._require(node)
        return _run(["ip", "netns", "exec", node.netns, *argv], input=input, timeout_s=timeout_s)

    def _require(self, node: Node) -> None:
        if node.netns not in self._created:
            raise NatLabError(f"namespace {node.netns} is not up: use the lab in a `with` block")

    def close(self) -> None:
        """Stop what `popen` started, then delete every namespace this lab created.

        Raises:
            NatLabError: some namespace could not be deleted (after trying them all).
        """
        self._stop_processes()
        failures = []
        for netns in reversed(list(self._created)):
            try:
                for pid in _run(["ip", "netns", "pids", netns]).stdout.split():
                    _kill(int(pid), signal.SIGKILL)  # a daemon that left its session
                _run(["ip", "netns", "del", netns])
                self._created.remove(netns)
            except NatLabError as exc:
                failures.append(str(exc))
        if failures:
            raise NatLabError("; ".join(failures))

    def _stop_processes(self) -> None:
        running = [proc for proc in self._processes if proc.poll() is None]
        for proc in running:
            _kill(proc.pid, signal.SIGTERM, group=True)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for proc in running:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("pid %d ignored SIGTERM for %g s: killing it", proc.pid,
                               STOP_TIMEOUT_S)
            _kill(proc.pid, signal.SIGKILL, group=True)  # and any child it left behind
            proc.wait(timeout=COMMAND_TIMEOUT_S)
        self._processes.clear()


def _kill(pid: int, sig: signal.Signals, *, group: bool = False) -> None:
    try:
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass

"""A UPnP router in the NAT lab: Debian's miniupnpd (nftables build) inside a router namespace.

miniupnpd refuses to map ports behind a WAN address in a shared or private range ("port
forwarding is impossible"), the lab's 100.64.0.0/24 included, so a lab with UPnP routers uses
`UPNP_INTERNET` instead: a /24 of its own, which exists only inside the lab's namespaces
(nothing outside them is touched; no packet leaves them).

miniupnpd is used from its unpacked package, not installed: installing it would start the
service in the machine's own namespace. `.ci/run` unpacks it into `MINIUPNPD_DIR`:

    apt-get download miniupnpd-nftables && dpkg -x miniupnpd-nftables_*.deb /opt/miniupnpd
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from testbed.natlab import Home, NatLab, lab_unavailable

__all__ = ["UPNP_INTERNET", "miniupnpd_binary", "start_upnp", "upnp_unavailable"]

UPNP_INTERNET = "11.0.0"
MINIUPNPD_DIR = Path("/opt/miniupnpd")
HTTP_PORT = 5555
START_TIMEOUT_S = 10.0

# The tables miniupnpd adds its rules to; the router's own (testbed.natlab) stay as they are.
# Its forward chain accepts what miniupnpd's chain lets through, and the router's own forward
# chain accepts DNAT'd packets, so a mapped port gets through both.
_RULES = """
table inet miniupnpd {
    chain miniupnpd { }
    chain prerouting_miniupnpd { }
    chain postrouting_miniupnpd { }
    chain forward { type filter hook forward priority 0; policy accept; jump miniupnpd; }
    chain prerouting {
        type nat hook prerouting priority -100; policy accept;
        jump prerouting_miniupnpd;
    }
    chain postrouting {
        type nat hook postrouting priority 100; policy accept;
        jump postrouting_miniupnpd;
    }
}
"""

_CONFIG = """ext_ifname=wan0
listening_ip=lan0
http_port={port}
enable_upnp=yes
enable_natpmp=no
secure_mode=yes
system_uptime=yes
upnp_table_name=miniupnpd
upnp_nat_table_name=miniupnpd
uuid=3d3cec3a-8cf0-11e0-98ee-001a6bd2d07b
allow 1024-65535 10.0.0.0/8 1024-65535
deny 0-65535 0.0.0.0/0 0-65535
"""


def miniupnpd_binary() -> str | None:
    """Where miniupnpd is: `$LORASWARM_MINIUPNPD`, the PATH, or the unpacked package."""
    candidates = [os.environ.get("LORASWARM_MINIUPNPD", ""), shutil.which("miniupnpd") or "",
                  str(MINIUPNPD_DIR / "usr" / "sbin" / "miniupnpd")]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def upnp_unavailable() -> str | None:
    """Why a UPnP router cannot run in the lab here (tests fail with it), or None."""
    reason = lab_unavailable()
    if reason:
        return reason
    if miniupnpd_binary() is None:
        return (f"no miniupnpd: unpack Debian's miniupnpd-nftables into {MINIUPNPD_DIR} "
                "(see .ci/run)")
    return None


def start_upnp(lab: NatLab, home: Home, folder: Path) -> subprocess.Popen[Any]:
    """Run miniupnpd on `home`'s router, its files in `folder` (the lab stops it); returns
    once it serves UPnP."""
    binary = miniupnpd_binary()
    if binary is None:
        raise RuntimeError(upnp_unavailable() or "no miniupnpd")
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "miniupnpd.conf"
    config.write_text(_CONFIG.format(port=HTTP_PORT))
    lab.run(home.router, ["nft", "-f", "-"], input=_RULES)
    log = (folder / "miniupnpd.log").open("w")
    proc = lab.popen(home.router, [binary, "-d", "-f", str(config), "-P",
                                   str(folder / "miniupnpd.pid")],
                     stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        listening = lab.run(home.router, ["ss", "-Hltn", f"sport = :{HTTP_PORT}"]).stdout
        if listening.strip():
            return proc
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    raise RuntimeError(f"miniupnpd did not start on {home.router.netns}: "
                       f"{(folder / 'miniupnpd.log').read_text()[-500:]}")

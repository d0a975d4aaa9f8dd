"""Network settings of a peer, and the libp2p connection settings derived from them."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import multiaddr

if TYPE_CHECKING:
    from libp2p.network.config import ConnectionConfig


@dataclass(frozen=True)
class NodeConfig:
    """Network settings of one peer."""

    listen: tuple[str, ...] = field(
        default=("/ip4/127.0.0.1/tcp/0",), metadata={"help": "multiaddrs to listen on"}
    )
    bootstrap: tuple[str, ...] = field(
        default=(), metadata={"help": "multiaddrs (with /p2p/<id>) of peers to join through"}
    )
    announce: tuple[str, ...] = field(
        default=(),
        metadata={"help": "multiaddrs to announce instead of the listen addresses, e.g. a "
                          "proxy's or a NAT's public address (/p2p/<our id> is added)"},
    )
    reachability_interval_s: float = field(
        default=600.0,
        metadata={"help": "seconds between asking a few neighbours to dial us back (are we "
                          "reachable from outside? status.json says; 0: never ask)"},
    )
    relay_rate: float = field(
        default=4 * 1024 * 1024,
        metadata={"help": "bytes/s we forward at most as a relay, all relayed connections "
                          "together (0: no cap)"},
    )
    upnp: bool = field(
        default=False,
        metadata={"help": "ask the router (UPnP IGD) to forward our TCP listen ports to us, and "
                          "announce its public address with them"},
    )
    relay_service: str = field(
        default="auto",
        metadata={"help": "relay for peers behind NAT: auto (while the swarm finds us public), "
                          "on, or off. A private peer reserves a slot on two relays and "
                          "announces its /p2p-circuit addresses"},
    )
    psk: str | None = field(  # a secret: kept out of repr, and so out of logs and tracebacks
        default=None, repr=False, metadata={"help": "64 hex chars: private swarm key"}
    )
    max_adapter_bytes: int = field(default=256 << 20, metadata={"help": "largest adapter taken"})
    fetch_timeout_s: float = field(
        default=30.0, metadata={"help": "limit for a fetch's download slot, dial and header, and "
                                        "the least time its body gets"})
    dial_timeout_s: float = field(default=10.0, metadata={"help": "limit for one dial"})
    max_uploads: int = field(default=4, metadata={"help": "concurrent adapter uploads"})
    max_downloads: int = field(default=4, metadata={"help": "concurrent adapter downloads"})
    min_upload_interval_s: float = field(
        default=0.5, metadata={"help": "least time between two uploads to one peer"}
    )
    min_upload_rate: float = field(
        default=64 * 1024,
        metadata={"help": "bytes/s below which a neighbour reading our adapter is dropped, so "
                          "that a client that asks and never reads frees its upload slot"},
    )
    allow_private_addrs: bool = field(
        default=False,
        metadata={"help": "dial loopback and private addresses announced by any peer (a LAN or "
                          "test swarm); off, they are dialled only when the announcement came "
                          "over a connection from the same kind of address"},
    )
    heartbeat_s: int = field(default=1, metadata={"help": "gossipsub heartbeat interval"})
    health_check_s: float = field(
        default=15.0,
        metadata={"help": "ping every connection this often and close those that do not answer "
                          "(0: never; then a frozen peer's connection is never noticed)"},
    )
    ping_timeout_s: float = field(default=5.0, metadata={"help": "limit for one health ping"})
    # Fetch deadlines that follow the link (gossip.linkstats, gossip.fetcher): fetch_timeout_s
    # bounds the setup (download slot, dial, header) and is the least time a body may take.
    max_fetch_s: float = field(
        default=300.0,
        metadata={"help": "the most time one fetch may take, however slow the link (never "
                          "below the fetch timeout)"},
    )
    stall_s: float = field(
        default=10.0,
        metadata={"help": "a fetch that receives no byte for this long fails (stalled)"},
    )
    min_fetch_rate: float = field(
        default=32 * 1024,
        metadata={"help": "bytes/s: past its estimated time, a fetch goes on only while its "
                          "average rate stays above this"},
    )
    wire_codec: str = field(
        default="sign",
        metadata={"help": "codec of the steps of the public estimate this peer serves: sign "
                          "(1 bit an entry; measured in the README), fp32 (exact), bf16, int8, "
                          "topk:F, ternary:F, each maybe +zstd; neighbours take any"},
    )
    settle_codec: str = field(
        default="auto",
        metadata={"help": "codec of the estimate's steps in settling rounds (--settle-rounds). "
                          "auto: the wire codec when it is fp32, bf16 or int8, else int8 (with "
                          "its +zstd): sparser steps stall consensus there (measured in the "
                          "README); unused with --wire-codec fp32, whose versions are keyframes"},
    )

    def __post_init__(self) -> None:
        for addr in (*self.listen, *self.bootstrap, *self.announce):
            try:
                multiaddr.Multiaddr(addr)
            except Exception as exc:  # multiaddr raises several unrelated types
                raise ValueError(f"not a multiaddr: {addr!r} ({exc})") from exc
        for addr in self.announce:
            if "/p2p/" in addr:
                raise ValueError(f"announce address {addr!r}: leave out /p2p/<id>, the peer "
                                 "adds its own")
        for addr in self.bootstrap:
            if "/p2p/" not in addr:
                raise ValueError(
                    f"bootstrap address {addr!r} lacks /p2p/<peer id>; copy the whole address "
                    "the first peer printed"
                )
        if self.psk is not None and (len(self.psk) != 64 or not _is_hex(self.psk)):
            raise ValueError("a swarm key is 64 hex characters; make one with `loraswarm keygen`")
        # Imported here: the codecs need torch, and `loraswarm --help` reads this class.
        from gossip.compress import parse_codec

        try:
            parse_codec(self.wire_codec)
        except ValueError as exc:
            raise ValueError(f"wire_codec: {exc}") from exc
        try:
            if self.settle_codec != "auto":
                parse_codec(self.settle_codec)
        except ValueError as exc:
            raise ValueError(f"settle_codec: {exc}") from exc
        if self.max_adapter_bytes < 1024:
            raise ValueError("max_adapter_bytes must be at least 1024")
        if self.fetch_timeout_s <= 0 or self.dial_timeout_s <= 0 or self.ping_timeout_s <= 0:
            raise ValueError("timeouts must be positive")
        if self.max_uploads < 1 or self.max_downloads < 1:
            raise ValueError("max_uploads and max_downloads must be at least 1")
        if not self.min_upload_rate > 0:
            raise ValueError("min_upload_rate must be a positive number of bytes/s")
        if self.relay_service not in ("auto", "on", "off"):
            raise ValueError(f"relay_service must be auto, on or off, got {self.relay_service!r}")
        if self.relay_rate < 0:
            raise ValueError("relay_rate must be >= 0 bytes/s (0: no cap)")
        if self.reachability_interval_s < 0:
            raise ValueError("reachability_interval_s must be >= 0 (0 turns the probe off)")
        if self.health_check_s < 0:
            raise ValueError("health_check_s must be >= 0 (0 turns health checks off)")
        if not (self.max_fetch_s > 0 and self.stall_s > 0):
            raise ValueError("max_fetch_s and stall_s must be positive")
        if not self.min_fetch_rate > 0:
            raise ValueError("min_fetch_rate must be a positive number of bytes/s")


def _is_hex(text: str) -> bool:
    try:
        bytes.fromhex(text)
    except ValueError:
        return False
    return True


def connection_config(config: NodeConfig) -> ConnectionConfig:
    """libp2p connection settings: health pings on, so that dead peers' connections close.

    Without health monitoring py-libp2p never notices a peer that froze or vanished without
    closing its sockets (PY-LIBP2P.md pitfall 7); its connection would keep it "connected" and
    so alive in the membership view forever.

    Protocol negotiation on a new stream may take as long as a fetch may (py-libp2p's default
    is 10 s). A fetch is bounded by `fetch_timeout_s` as a whole; a shorter limit inside it
    only failed fetches that would have finished: with 64 peers in one process, 1,311 of 1,446
    failed fetches were negotiations cut off at 10 s while the event loop was busy.
    """
    from libp2p.network.config import ConnectionConfig  # libp2p: see `NodeConfig.__post_init__`

    negotiation = float(max(10, config.fetch_timeout_s))
    settings = ConnectionConfig(outbound_stream_protocol_negotiation_timeout=negotiation,
                                inbound_stream_protocol_negotiation_timeout=negotiation)
    if config.health_check_s == 0:
        return settings
    return replace(
        settings,
        enable_health_monitoring=True,
        health_initial_delay=config.health_check_s,
        health_check_interval=config.health_check_s,
        ping_timeout=config.ping_timeout_s,
        abort_connection_on_ping_failure=True,
    )

"""What `--http` serves: a dashboard, status.json, Prometheus metrics and the recent rounds.

    loraswarm peer --data-dir ./peer1 --train my-data.jsonl --http 8080
    # then open http://127.0.0.1:8080/ , or scrape http://127.0.0.1:8080/metrics

Pages are built on the event loop from the peer's live records (a few dicts: under a
millisecond), at most every `STATUS_TTL_S`, however fast clients poll; only reading
metrics.jsonl goes to a worker thread, one read at a time, and only when the file has changed
since the last read. What serving costs the peer is measured by `scripts/bench_http.py`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar
from urllib.parse import parse_qs

import trio

from peer.errors import ConfigError
from peer.http import HttpLimits, HttpServer, Response, is_loopback, split_listen
from peer.metrics_export import exposition, peer_registry

if TYPE_CHECKING:
    from peer.daemon import Peer

logger = logging.getLogger(__name__)

MAX_ROUNDS = 1000  # lines /rounds.json returns at most
DEFAULT_ROUNDS = 500
MAX_TAIL_BYTES = 4 << 20  # of metrics.jsonl read for them (a line with its sketch: ~1.5 KB)
# The fields of a metrics line that the dashboard plots; the rest (sketch, tried) stay on disk.
ROUND_FIELDS = ("round", "version", "samples", "train_loss", "eval_loss", "merged", "merges",
                "bytes_in", "bytes_out", "peers_live", "round_s", "train_s", "gather_s", "ts")
JSON = "application/json"
LIMITS = HttpLimits()  # what one HTTP client may cost the peer
STATUS_TTL_S = 0.5  # status and metrics are rebuilt at most this often
T = TypeVar("T")


def dashboard_html() -> bytes:
    """The dashboard page: one file with its script and style inline (it works offline)."""
    return resources.files("peer").joinpath("dashboard.html").read_bytes()


@dataclass
class _Tail:
    """The last lines of metrics.jsonl, as of the file's size and mtime when read."""

    key: tuple[int, int] = (-1, -1)
    rounds: tuple[dict[str, Any], ...] = ()


class RoundsReader:
    """The last `MAX_ROUNDS` metrics lines, re-read in a worker thread only after they change."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._tail = _Tail()
        self._limiter = trio.CapacityLimiter(1)  # many clients, still one reader thread

    async def last(self, count: int) -> list[dict[str, Any]]:
        try:
            stat = os.stat(self.path)  # a few microseconds: no thread needed to see no change
        except FileNotFoundError:
            return []
        if (stat.st_size, stat.st_mtime_ns) != self._tail.key:
            self._tail = await trio.to_thread.run_sync(self._read, stat, limiter=self._limiter)
        return list(self._tail.rounds[-count:]) if count else []

    def _read(self, stat: os.stat_result) -> _Tail:
        key = (stat.st_size, stat.st_mtime_ns)
        with open(self.path, "rb") as handle:
            start = max(0, stat.st_size - MAX_TAIL_BYTES)
            handle.seek(start)
            lines = handle.read(MAX_TAIL_BYTES).split(b"\n")
        if start:
            lines = lines[1:]  # the first is cut
        rounds = [row for row in map(_round_of, lines[-MAX_ROUNDS - 1:]) if row is not None]
        return _Tail(key, tuple(rounds[-MAX_ROUNDS:]))


def _round_of(line: bytes) -> dict[str, Any] | None:
    """The plotted fields of one metrics line; None for a torn or foreign line."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict) or "round" not in record:
        return None
    return {key: _finite(record.get(key)) for key in ROUND_FIELDS}


def _finite(value: Any) -> Any:
    # json.dumps would write NaN, which the browser's JSON.parse refuses.
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _count(query: str) -> int:
    """`last=N` of /rounds.json, clamped to 0..MAX_ROUNDS; a bad N is the default."""
    values = parse_qs(query, max_num_fields=4).get("last", [])
    try:
        return max(0, min(MAX_ROUNDS, int(values[0]))) if values else DEFAULT_ROUNDS
    except ValueError:
        return DEFAULT_ROUNDS


class Fresh(Generic[T]):
    """A value built by `build` at most once every `ttl_s` seconds (trio's clock)."""

    def __init__(self, build: Callable[[], T], ttl_s: float) -> None:
        self.build, self.ttl_s = build, ttl_s
        self._value: tuple[float, T] | None = None  # (when built, value)

    def get(self) -> T:
        now = trio.current_time()
        if self._value is None or now - self._value[0] >= self.ttl_s:
            self._value = (now, self.build())
        return self._value[1]


class PeerWeb:
    """The routes of one peer's HTTP server, read from the peer at each request."""

    def __init__(self, peer: Peer) -> None:
        self.peer = peer
        self.server = HttpServer({"/": self.dashboard, "/status.json": self.status,
                                  "/metrics": self.metrics, "/rounds.json": self.rounds},
                                 LIMITS)
        self.registry = peer_registry(self._values)
        self.rounds_reader = RoundsReader(peer.config.data_dir / "metrics.jsonl")
        self._page = dashboard_html()
        # Clients may poll far faster than anything in these changes.
        self._status = Fresh(peer.status, STATUS_TTL_S)
        self._status_reply = Fresh(lambda: _json(self._status.get()), STATUS_TTL_S)
        self._metrics_reply = Fresh(lambda: Response(
            200, exposition(self.registry), "text/plain; version=0.0.4; charset=utf-8"),
            STATUS_TTL_S)

    async def dashboard(self, query: str) -> Response:
        return Response(200, self._page, "text/html; charset=utf-8")

    async def status(self, query: str) -> Response:
        return self._status_reply.get()

    async def metrics(self, query: str) -> Response:
        return self._metrics_reply.get()

    async def rounds(self, query: str) -> Response:
        return _json({"rounds": await self.rounds_reader.last(_count(query))})

    def _values(self) -> dict[str, Any]:
        status, loss = self._status.get(), self.peer.stats.last_train_loss
        # 0.0 is the statistics' "no training round in this run yet": a cross-entropy never is.
        return {**status, "peers_live": len(status.get("live_peers", [])),
                "train_loss": loss if loss > 0 else None,
                "http_dropped": dict(self.server.statistics().dropped)}


def _json(document: Any) -> Response:
    # NaN would be written as the bare word NaN, which the browser's JSON.parse refuses.
    return Response(200, json.dumps(_scrub(document), sort_keys=True, default=str).encode(),
                    JSON)


def _scrub(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _scrub(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub(item) for item in value]
    return _finite(value)


async def serve_peer_http(peer: Peer, listen: str, *,
                          task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Serve `peer`'s pages on `listen` (HOST:PORT) until cancelled; started with its URL.

    Raises:
        ConfigError: the address cannot be listened on (taken, or not this machine's).
    """
    host, port = split_listen(listen)
    web = PeerWeb(peer)
    async with trio.open_nursery() as nursery:
        try:
            url = await nursery.start(web.server.serve, host, port)
        except OSError as exc:
            raise ConfigError(f"--http {listen}: cannot listen there ({exc.strerror or exc}); "
                              "pick another port, or 0 for any free one") from exc
        if not is_loopback(host):
            logger.warning("http: %s is reachable from other machines, with no password; "
                           "use a loopback address unless you mean it", url)
        logger.info("http: dashboard at %s (metrics at %smetrics)", url, url)
        task_status.started(url)

"""Log output of the `loraswarm` CLI: readable text, or one JSON object per line.

    loraswarm -v peer --data-dir ./peer1 --train my.jsonl --log-format json

gives lines such as

    {"ts": "2026-11-26T07:40:01.123Z", "level": "INFO", "logger": "peer.records",
     "message": "final checkpoint and export written to peer1", "peer_id": "12D3KooW...",
     "round": 12}

for a log collector. `peer_id` and `round` are there once the peer knows them: a running
`Peer` sets `PEER_LOG_FIELDS` for its own task tree (trio copies context variables into the
tasks and worker threads it starts), so in-process peers of a simulation each tag their own
lines. Libraries only log; this module is used by the CLI alone (STYLE.md, logging).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# What the running peer adds to each line: a function, so that the round is read when a line is
# written, not when the peer started.
PEER_LOG_FIELDS: ContextVar[Callable[[], dict[str, Any]] | None] = ContextVar(
    "loraswarm_peer_log_fields", default=None)


class PeerFields(logging.Filter):
    """Puts the running peer's `peer_id` and `round` on each record (None when unknown)."""

    def filter(self, record: logging.LogRecord) -> bool:
        fields = PEER_LOG_FIELDS.get()
        known = fields() if fields is not None else {}
        record.peer_id = known.get("peer_id")
        record.round = known.get("round")
        return True


class JsonLines(logging.Formatter):
    """One JSON object per record: ts (UTC, ISO 8601), level, logger, message, and peer_id and
    round when known; a traceback, if any, as `exc`."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname, "logger": record.name, "message": record.getMessage(),
        }
        for key in ("peer_id", "round"):
            value = getattr(record, key, None)
            if value is not None:
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class _CliHandler(logging.StreamHandler):
    """The handler `configure_logging` installs (and replaces when called again)."""


def configure_logging(verbose: int, log_format: str = "text") -> None:
    """Send log records to stderr as text or JSON lines, replacing the handler of an earlier
    call. A root logger that someone else configured (an embedding program, pytest) keeps its
    handlers: only our loggers' levels are set then, as `logging.basicConfig` would.

    Args:
        verbose: 0 warnings (and the peer's own info lines), 1 info, 2 or more debug.
        log_format: "text" or "json".
    """
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {log_format!r}")
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    root = logging.getLogger()
    ours = [handler for handler in root.handlers if isinstance(handler, _CliHandler)]
    if len(ours) == len(root.handlers):
        for handler in ours:
            root.removeHandler(handler)
        handler = _CliHandler(sys.stderr)
        handler.addFilter(PeerFields())
        handler.setFormatter(JsonLines() if log_format == "json"
                             else logging.Formatter(TEXT_FORMAT))
        root.addHandler(handler)
        root.setLevel(level)
    if log_format == "json":
        # Every stderr line must parse: Python warnings become records, and the progress bars
        # of transformers and the hub (read when they are first imported: after this) stay off.
        logging.captureWarnings(True)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # py-libp2p's relay logs routine events as errors ("Error reading from hop stream" for each
    # reservation); ours (gossip.relay) says what happened, so keep its own for -vv.
    logging.getLogger("libp2p.relay.circuit_v2").setLevel(
        logging.DEBUG if verbose >= 2 else logging.CRITICAL)
    logging.getLogger("loraswarm").setLevel(min(level, logging.INFO))
    logging.getLogger("peer").setLevel(min(level, logging.INFO))

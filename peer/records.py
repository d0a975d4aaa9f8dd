"""The records a peer writes: its checkpoint, a metrics line per round, and status.json.

They are taken on the event loop (a consistent picture of the peer); hashing the adapter into a
sketch, writing and fsyncing run in a worker thread, so that serving neighbours never waits on
the disk.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import trio

from gossip.membership import Membership
from gossip.nodes import Node
from peer.setup import Runtime
from peer.stats import PeerStatistics, shape_of
from peer.store import Checkpoint
from peer.telemetry import swarm_status

logger = logging.getLogger(__name__)


@dataclass
class Records:
    """Builds a peer's records from its parts and writes them to its store."""

    runtime: Runtime
    node: Node
    membership: Membership
    stats: PeerStatistics
    http: str | None = None  # the URL that --http serves on, once it listens

    def checkpoint(self, state: Mapping[str, torch.Tensor] | None, *, round_: int,
                   version: int) -> Checkpoint:
        trainer = self.runtime.trainer
        return Checkpoint(
            state=trainer.state() if state is None else dict(state), version=version,
            samples=trainer.samples, round=round_, swarm=self.runtime.swarm_hex,
            counters=self.totals(),
        )

    def metrics(self, *, round_: int, version: int, loss: float | None, merged: int,
                evaluated: bool, tried: list[str], train_s: float | None = None,
                gather_s: float | None = None, round_s: float | None = None,
                state: Mapping[str, torch.Tensor] | None = None) -> dict[str, Any]:
        """One metrics line; with `state`, its sketch and norm too (see `shape_of`).

        Args:
            train_s: seconds this round spent in training steps (None: it did not train).
            gather_s: seconds it spent fetching and validating neighbours' adapters, waits
                for untrained neighbours included.
            round_s: seconds from the round's start to this line: training, announcing,
                gathering, merging and evaluating, not writing the checkpoint and this line.
        """
        record = {
            "round": round_, "version": version, "samples": self.runtime.trainer.samples,
            "train_loss": loss, "lr": self.runtime.trainer.lr,
            "eval_loss": self.stats.last_eval if evaluated else None,
            "merged": merged, **self.totals(),
            "train_s": _seconds(train_s), "gather_s": _seconds(gather_s),
            "round_s": _seconds(round_s),
            "peers_live": len(self.membership.view.live(trio.current_time())),
            "privacy": self.runtime.trainer.ledger.record_dict(),
            "tried": tried, "ts": time.time(),
        }
        return record if state is None else {**record, **shape_of(state)}

    def status(self, *, round_: int, version: int) -> dict[str, Any]:
        """The status.json document: what this peer is and how it is doing.

        `pid`, `host` and `running` (False once it stopped cleanly) let `loraswarm status` tell
        a running peer from a stopped or crashed one.
        """
        runtime, node, now = self.runtime, self.node, trio.current_time()
        view = self.membership.view
        view_stats = view.statistics(now)
        live = [info.peer_id for info in view.live(now)]
        return {
            "peer_id": node.peer_id, "listen_addrs": node.listen_addrs, "topic": node.topic,
            "swarm_id": runtime.swarm_hex, "model": str(runtime.model_dir),
            "device": runtime.placement.describe(),
            "round": round_, "version": version, "samples": runtime.trainer.samples,
            **{k: v for k, v in self.totals().items() if k != "t"},
            "peers_known": len(view), "peers_connected": len(node.connected_peers()),
            "live_peers": live,
            "peers_trusted": view_stats.trusted, "peers_refused": view_stats.refused,
            # What we refused from others (the node counts the wire, the gatherer validation:
            # disjoint), and the uploads our server refused, by reason.
            "rejected": dict(self.stats.rejected + node.rejected),
            "uploads_refused": dict(node.server.refused),
            # Each live neighbour's link as our fetches measured it (the deadlines follow it).
            "links": {peer: link.to_status()
                      for peer, link in node.links.statistics(live).items()},
            "wire": wire_status(node),
            "reachability": node.reachability.to_status(),
            "catchup": node.catchup_status(),
            "relay": {**node.relay_status(),
                      "relayed_deferred": self.membership.relayed_deferred},
            "privacy": runtime.trainer.ledger.record_dict(),
            "eval_loss": self.stats.last_eval,
            # What each live peer, and we, last announced about ourselves (peer.telemetry).
            "swarm": swarm_status(node.current, self.membership.reports()),
            "pid": os.getpid(), "host": socket.gethostname(), "running": True,
            "updated": time.time(),
            **({"http": self.http} if self.http else {}),
        }

    async def save_round(self, state: Mapping[str, torch.Tensor], *, round_: int, version: int,
                         **metrics: Any) -> None:
        """Checkpoint `state` (a copy of the adapter as it is now) and log the round.

        Args:
            metrics: what `metrics` takes besides the round, version and state.
        """
        store = self.runtime.store
        record = self.metrics(round_=round_, version=version, **metrics)
        checkpoint = self.checkpoint(state, round_=round_, version=version)
        status = self.status(round_=round_, version=version)

        def write() -> None:
            store.save_checkpoint(checkpoint)
            store.append_metrics({**record, **shape_of(state)})
            store.write_status(status)

        await trio.to_thread.run_sync(write)

    def save_final(self, status: dict[str, Any], *, round_: int, version: int) -> None:
        """Final checkpoint, export and `status` (taken on the event loop); blocks."""
        store, trainer = self.runtime.store, self.runtime.trainer
        store.save_checkpoint(self.checkpoint(None, round_=round_, version=version))
        with trainer.alone():  # a shared model: peft's save walks every peer's adapter otherwise
            store.export(trainer.model, trainer.adapter)
        store.write_status({**status, "running": False})
        logger.info("final checkpoint and export written to %s", store.root)

    def totals(self) -> dict[str, Any]:
        return self.stats.totals(bytes_in=self.node.bytes_in,
                                 bytes_out=self.node.server.bytes_out)


def wire_status(node: Node) -> dict[str, Any]:
    """The codec, our public estimate (its version and the steps kept for deltas), the uploads
    by kind (keyframe, delta, current), and what we hold of neighbours' estimates."""
    offer = node.server.current
    estimate = None if offer is None else {
        "version": offer.version, "history_steps": len(offer.estimate.history),
        "history_bytes": sum(len(step.payload) for step in offer.estimate.history),
        "keyframe_bytes": offer.keyframe_bytes,
    }
    return {"codec": node.config.wire_codec, "estimate": estimate,
            "served": dict(node.server.served_kinds), "replicas": node.replicas.statistics()}


def _seconds(value: float | None) -> float | None:
    return None if value is None else round(value, 4)

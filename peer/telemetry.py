"""The swarm as its members describe themselves: our own telemetry, and status.json's "swarm".

Each announcement carries a `gossip.telemetry.Telemetry` record; every member hears every
announcement, so each peer can list the whole swarm without a server. All of it is
self-reported (`"self_reported": true` in status.json): a peer may lie about its round or loss,
so the figures are for watching a swarm, never for weighting a merge.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from gossip.telemetry import MAX_LOSS, Telemetry
from gossip.wire import Announcement
from peer.config import PeerConfig
from peer.setup import Runtime
from peer.stats import PeerStatistics

ROW_KEYS = ("peer_id", "round", "version", "samples", "train_loss", "eval_loss", "device",
            "rank", "merge_rule", "age_s")


def own_telemetry(config: PeerConfig, runtime: Runtime, stats: PeerStatistics,
                  round_: int) -> Telemetry:
    """What this peer reports with the adapter that ends round `round_` (0: before training).

    An eval loss the wire would refuse (NaN after a divergence, or absurdly large) is reported
    as none: a peer must never send what its neighbours reject.
    """
    loss = stats.last_eval
    if loss is not None and not (math.isfinite(loss) and 0.0 <= loss <= MAX_LOSS):
        loss = None
    return Telemetry(round=round_, eval_loss=None if loss is None else float(loss),
                     device=runtime.placement.device.type, rank=config.lora.rank,
                     merge_rule=config.merge.rule)


def swarm_status(own: Announcement | None,
                 reports: Iterable[tuple[Announcement, float]]) -> dict[str, Any]:
    """status.json's "swarm": one row per live peer we know, ourselves first.

    Args:
        own: our latest announcement (None before the first one).
        reports: each live peer's newest announcement and its age in seconds
            (`Membership.reports`).
    """
    rows = [swarm_row(own, 0.0)] if own is not None else []
    rows += [swarm_row(announcement, age) for announcement, age in reports]
    return {"self_reported": True, "peers": rows}


def swarm_row(announcement: Announcement, age_s: float) -> dict[str, Any]:
    """One peer's row: its announcement's version, samples and train loss, and its telemetry.

    A peer that sent no telemetry has None for those fields; one that has not trained yet
    (round 0) has no train loss, whatever its announcement's placeholder says.
    """
    t = announcement.telemetry
    trained = t is None or t.round > 0
    return {
        "peer_id": announcement.peer, "round": None if t is None else t.round,
        "version": announcement.version, "samples": announcement.samples,
        "train_loss": announcement.train_loss if trained else None,
        "eval_loss": None if t is None else t.eval_loss,
        "device": None if t is None else t.device, "rank": None if t is None else t.rank,
        "merge_rule": None if t is None else t.merge_rule, "age_s": round(age_s, 1),
    }

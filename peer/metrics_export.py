"""A peer's numbers in the Prometheus text format, read from its live records at scrape time.

`PeerCollector` holds no copies: each scrape calls `read`, which returns the status.json
document plus the last training loss and the HTTP server's own counters, and turns it into
metric families named by Prometheus conventions (`_total` counters, base units, one
`reason` label for what was refused). Each peer has its own registry, never the global one,
so that peers sharing a process do not mix.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

# status.json key -> (metric name without _total, help) for the totals that only grow.
COUNTERS = {
    "merges": ("loraswarm_merges", "Neighbour adapters merged into this peer's adapter."),
    "adapters_received": ("loraswarm_adapters_received",
                          "Neighbour adapters fetched intact, valid or not."),
    "bytes_in": ("loraswarm_bytes_received", "Adapter bytes fetched from neighbours."),
    "bytes_out": ("loraswarm_bytes_sent", "Adapter bytes served to neighbours."),
    "samples": ("loraswarm_samples", "Training examples this peer's adapter has seen."),
    "t_train": ("loraswarm_train_seconds", "Seconds spent in training steps."),
}
# status.json key -> (metric name, help) for values that go up and down.
GAUGES = {
    "round": ("loraswarm_round", "Rounds completed."),
    "version": ("loraswarm_version", "Version of the adapter this peer serves."),
    "eval_loss": ("loraswarm_eval_loss", "Loss on the held-out data at the last evaluation."),
    "train_loss": ("loraswarm_train_loss", "Mean training loss of the last training round."),
    "peers_live": ("loraswarm_peers_live", "Peers heard from within --peer-timeout."),
    "peers_known": ("loraswarm_peers_known", "Peers in the membership view."),
    "peers_connected": ("loraswarm_peers_connected", "Peers with an open libp2p connection."),
    "peers_trusted": ("loraswarm_peers_trusted", "Peers that served an adapter that passed "
                      "validation."),
    "peers_refused": ("loraswarm_peers_refused", "Peers the view refused to admit."),
}
# status.json's `privacy` key -> (metric name, help): the ledger of a DP peer.
PRIVACY = {
    "epsilon": ("loraswarm_privacy_epsilon", "Epsilon spent on this peer's own DP steps at "
                "--dp-delta (absent without a guarantee)."),
    "budget": ("loraswarm_privacy_epsilon_budget", "--dp-epsilon: training stops before "
               "spending more."),
    "noise_multiplier": ("loraswarm_privacy_noise_multiplier", "Noise multiplier (sigma) of "
                         "this run's DP steps."),
}
# status.json key (a reason -> count mapping) -> (metric name without _total, help).
BY_REASON = {
    "rejected": ("loraswarm_rejected", "Neighbour adapters refused, by reason."),
    "uploads_refused": ("loraswarm_uploads_refused", "Fetches of our adapter refused, by "
                        "reason."),
    "http_dropped": ("loraswarm_http_dropped", "HTTP clients dropped without a reply, by "
                     "reason."),
}


class PeerCollector(Collector):
    """Collects one peer's metrics from `read()`, a status.json-like mapping, at each scrape."""

    def __init__(self, read: Callable[[], Mapping[str, Any]]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        values = self._read()
        info = InfoMetricFamily("loraswarm_peer", "Who this peer is.")
        info.add_metric([], {key: str(values.get(key, "")) for key in
                             ("peer_id", "swarm_id", "device", "http")})
        yield info
        for key, (name, doc) in COUNTERS.items():
            if _number(values.get(key)):
                yield CounterMetricFamily(name, doc, value=float(values[key]))
        for key, (name, doc) in GAUGES.items():
            if _number(values.get(key)):  # an eval loss before the first evaluation is absent
                yield GaugeMetricFamily(name, doc, value=float(values[key]))
        live = values.get("live_peers")
        if "peers_live" not in values and isinstance(live, list):
            yield GaugeMetricFamily(*GAUGES["peers_live"], value=len(live))
        yield from _privacy(values.get("privacy"))
        for key, (name, doc) in BY_REASON.items():
            family = CounterMetricFamily(name, doc, labels=["reason"])
            for reason, count in sorted(dict(values.get(key) or {}).items()):
                family.add_metric([str(reason)], float(count))
            yield family


def peer_registry(read: Callable[[], Mapping[str, Any]]) -> CollectorRegistry:
    """A registry of its own holding a `PeerCollector` over `read`."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PeerCollector(read))
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    """The registry in the Prometheus text format (version 0.0.4)."""
    return generate_latest(registry)


def _privacy(ledger: Any) -> Iterator[Metric]:
    """A DP peer's ledger: ε spent, its budget and σ, and the steps counted."""
    if not isinstance(ledger, Mapping) or ledger.get("budget") is None:
        return  # no --dp-epsilon: nothing private to watch
    for key, (name, doc) in PRIVACY.items():
        if _number(ledger.get(key)):
            yield GaugeMetricFamily(name, doc, value=float(ledger[key]))
    if _number(ledger.get("steps")):
        yield CounterMetricFamily("loraswarm_privacy_steps", "Training steps in this peer's "
                                  "privacy ledger.", value=float(ledger["steps"]))


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)

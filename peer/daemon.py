"""The peer daemon: one nursery that owns the network node and the round loop.

One round, as in DESIGN.md:
  1. train `steps_per_round` steps in a worker thread (the event loop keeps serving);
  2. offer the new adapter bytes and describe them in a signed announcement (published at
     once only the first time; later ones ride on the periodic re-announcement);
  3. draw `fanout` live neighbours uniformly at random from the membership view;
  4. fetch their newest adapters concurrently, each under its own timeout, replacing a
     neighbour that fails by another one;
  5. decode and validate each (keys, shapes, dtypes, finite, norm bound);
  6. merge self + accepted neighbours with the configured rule and swap the result in;
  7. evaluate, checkpoint atomically, append a metrics line, rewrite status.json.

After `rounds` training rounds, `settle_rounds` more rounds skip step 1: they only exchange and
merge, which pulls the peers' adapters together (gossip averaging), so the swarm ends close to
one adapter instead of N slightly different ones. Each lasts as long as the last training round,
so that neighbours have merged in between.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Mapping
from typing import Any

import trio

from gossip.errors import GossipError, TransferError, WireError
from gossip.membership import Membership
from gossip.node import GossipNode
from gossip.wire import Announcement, decode_adapter, digest, encode_adapter
from merge.buffer import NeighbourBuffer
from merge.errors import RejectedUpdate
from merge.quorum import buffer_capacity
from merge.reference import NormReference
from merge.registry import rule
from merge.rules import merge_states
from merge.types import Contribution
from merge.validate import MAX_RANK_FACTOR, validate_update
from peer.attacks import poison
from peer.config import PeerConfig
from peer.setup import Runtime, build_runtime
from peer.shared import SharedModel
from peer.sketch import adapter_norm, sketch
from peer.store import Checkpoint
from topology.view import MembershipView

logger = logging.getLogger(__name__)
# Waves of fetches per round: the first draws `fanout` neighbours, later ones replace failures.
_GATHER_WAVES = 3
# Then neighbours that had not trained yet are fetched again after 1, 2, 4... s.
_PATIENCE_FIRST_S = 1.0
# Fetch failures that say nothing about a neighbour's honesty: it was busy, or the network
# failed it (see `_judge`).
_BUSY = frozenset({"refused"})
_NETWORK = frozenset({"timeout", "unreachable", "truncated"})
# Room for a safetensors header to grow with a neighbour's other rank (`product` only).
_HEADER_SLACK = 64 * 1024


class Peer:
    """A loraswarm peer. `run` returns after `config.total_rounds` rounds, or when cancelled."""

    def __init__(self, config: PeerConfig, shared: SharedModel | None = None) -> None:
        self.config = config
        self.shared = shared  # a base model shared with other peers of this process
        self.runtime: Runtime | None = None
        self.node: GossipNode | None = None
        self.view: MembershipView | None = None
        self.rng = random.Random()
        self.membership: Membership | None = None
        self.round = 0
        self.completed = 0  # rounds whose checkpoint and metrics line are on disk
        self.version = 0
        self.merges = 0
        self.adapters_received = 0
        self.rejected: Counter[str] = Counter()
        self.last_eval: float | None = None
        self.last_train_loss = 0.0  # announced in settling rounds, which do not train
        self._training_round_s = 0.0  # how long the last training round took (paces settling)
        self._train_s = 0.0  # how long the last training took (bounds waiting for neighbours)
        self._latest: dict[str, Announcement] = {}
        self._stop = threading.Event()
        self._started = time.monotonic()
        self._before: dict[str, float] = {}  # totals of earlier runs, from the checkpoint
        self._round_done = trio.Event()
        self._scope = trio.CancelScope()  # `crash` cancels it
        self._crashed = False
        # Coordinate-wise rules need more inputs than one round's fetches: they merge over a
        # buffer of the latest adapter of each recently heard neighbour, sized so that the share
        # of bad ones in it tracks the swarm's (`--trim-fraction`).
        needs = rule(config.merge.rule)
        self._buffered = needs.buffered
        self._buffer = NeighbourBuffer(buffer_capacity(config.merge), max_age=config.merge.max_age)
        self._min_buffered = needs.min_neighbours(config.merge)
        self._rank_free = needs.rank_free
        # The scale that bounds a neighbour's norm and distance: recent accepted neighbours'
        # median norm, which one liar cannot inflate round after round as it could our own.
        self._reference = NormReference()
        self._scale = 0.0  # this round's, set before fetching
        self._tried: list[str] = []  # neighbours this round fetched from (metrics)
        self._accepted_norms: list[float] = []  # this round's, for the reference

    async def load(self) -> Runtime:
        """Load the model, data and last checkpoint without joining the network yet.

        Many peers of one process load first and then join together, so that none finishes
        its rounds before the last has joined.
        """
        self.runtime = await trio.to_thread.run_sync(build_runtime, self.config, self.shared)
        return self.runtime

    async def wait_rounds(self, rounds: int) -> None:
        """Return once this peer has finished `rounds` rounds (for tests and embedders)."""
        while self.completed < rounds:
            await self._round_done.wait()

    def crash(self) -> None:
        """Stop at once, as a killed process would: no final checkpoint, export or status.

        `run` returns soon after (a training step in progress finishes first); on disk is what
        the last completed round wrote. For churn among peers of one process.
        """
        self._crashed = True
        self._scope.cancel()

    def request_stop(self) -> None:
        """Ask the training thread to return at its next step boundary (signal handlers)."""
        self._stop.set()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Load (unless `load` ran), join the swarm, signal readiness with the node, run rounds."""
        runtime = self.runtime or await self.load()
        if runtime.resumed is not None:
            self.version, self.round = runtime.resumed.version, runtime.resumed.round
            self.completed = self.round
            self._resume_counters(runtime.resumed.counters)
        identity = self.config.data_dir
        node = GossipNode(self.config.network, runtime.swarm, identity)
        self.node = node
        self.view = MembershipView(self.config.topology, node.peer_id)
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    await nursery.start(node.run)
                    await nursery.start(self._listen)
                    self._write_status()
                    task_status.started(node)
                    await self._rounds()
                    await self._linger()
                    nursery.cancel_scope.cancel()
        finally:
            if not self._crashed:
                with trio.CancelScope(shield=True):
                    status = self.status() if self._can_report() else None
                    await trio.to_thread.run_sync(self._persist_final, status)

    async def _wait_for_topic_peer(self) -> None:
        """Hold the join announcement until a connected peer has subscribed to the swarm topic.

        Published before that, it goes nowhere, and the swarm learns of us only at our first
        re-announcement: measured with 64 peers over two worker processes, the median peer knew
        3 others after three training rounds. Bounded by `--wait-timeout`; a peer without
        `--bootstrap` starts the swarm and does not wait.
        """
        membership, node = self._membership(), self._node()
        if not self.config.network.bootstrap:
            return
        with trio.move_on_after(self.config.wait_timeout_s):
            await membership.wait_until(lambda: bool(node.topic_peers()))
            return
        logger.warning("no swarm peer after %.0f s; announcing anyway", self.config.wait_timeout_s)

    async def _wait_for_peers(self) -> None:
        """Hold the first round until `wait_peers` others are live (a swarm starting together)."""
        wanted = self.config.wait_peers
        if not wanted or self.round:
            return
        membership = self._membership()
        logger.info("waiting for %d other peers before the first round", wanted)
        with trio.move_on_after(self.config.wait_timeout_s):
            await membership.wait_until(lambda: len(membership.live_peers()) >= wanted)
            logger.info("%d peers live; starting", len(membership.live_peers()))
            return
        logger.warning("only %d of %d peers live after %.0f s; starting anyway",
                       len(membership.live_peers()), wanted, self.config.wait_timeout_s)

    async def _rounds(self) -> None:
        runtime = self._runtime()
        await self._wait_for_peers()
        if self.version == 0:
            # Tell the swarm before round 1 that we are here (serving the seeded adapter): sent
            # only after round 1's training, a first announcement reached the neighbours too
            # late for their round 1; with 32 peers in one process, 23 merged nothing in it.
            # A restarted peer announces after its next round, as before its crash: its
            # checkpoint holds the merged adapter of a version whose pre-merge bytes it served.
            await self._wait_for_topic_peer()
            await self._announce(runtime.trainer.state())
        if self.round == 0 and runtime.eval_batches:
            await self._evaluate(record=True)
        total = self.config.total_rounds
        while not total or self.round < total:
            settling, started = not self.training(), trio.current_time()
            await self._one_round()
            if self._stop.is_set():
                return
            took = trio.current_time() - started
            pause = self.config.round_pause_s
            if settling:
                # Unpaced, a settling round takes a fraction of a second and fetches adapters
                # its neighbours have not merged since; measured with 8 peers, consensus then
                # stalled near 3 %. Lasting as long as a training round, it lets them move.
                pause = max(pause, self._training_round_s - took)
            else:
                self._training_round_s = took
            if pause > 0:
                await trio.sleep(pause)

    async def _linger(self) -> None:
        """Keep serving the final adapter for `--linger` seconds after the last round.

        Peers of one swarm finish at different times; measured with 64 peers in one process,
        68 of 384 settling rounds merged nothing because the neighbours drawn had finished and
        left. A peer stopped by a signal does not linger.
        """
        if self.config.linger_s and not self._stop.is_set():
            logger.info("all %d rounds done; serving the final adapter for %.0f s",
                        self.round, self.config.linger_s)
            await trio.sleep(self.config.linger_s)

    def training(self) -> bool:
        """Whether the next round trains: every round but the settling ones after `rounds`."""
        return not self.config.rounds or self.round < self.config.rounds

    async def _one_round(self) -> None:
        runtime = self._runtime()
        self._stop.clear()
        loss: float | None = None
        if self.training():
            started = trio.current_time()
            loss = self.last_train_loss = await trio.to_thread.run_sync(self._train)
            self._train_s = trio.current_time() - started
        self.version += 1
        state = runtime.trainer.state()
        await self._announce(state)
        accepted = await self._gather(state)
        own = Contribution(state=state, samples=runtime.trainer.samples, age=0)
        others = self._merge_inputs(accepted)
        if others:
            # merge_states returns a fresh copy, so it also feeds the checkpoint and the sketch.
            state = await trio.to_thread.run_sync(merge_states, own, others, self.config.merge)
            runtime.trainer.load_state(state)
            self.merges += len(accepted)
        self.round += 1
        last = self.round == self.config.total_rounds  # the final adapter is always evaluated
        evaluated = runtime.eval_batches and (self.round % self.config.eval_every == 0 or last)
        if evaluated:
            await self._evaluate(record=False)
        await self._persist(state, loss, len(accepted), evaluated=bool(evaluated))
        self.completed = self.round
        self._round_done.set()
        self._round_done = trio.Event()

    async def _announce(self, state: dict[str, Any]) -> None:
        """Serve this round's adapter (poisoned, for an attacker) and describe it, signed.

        Only a peer's first announcement is published at once: it tells the swarm that the
        peer has an adapter to fetch. Later ones ride on the next re-announcement (every
        third of `--peer-timeout`), because fetches always get the newest adapter anyway,
        with its version, samples and digest in the transfer header. Published every round,
        each of N announcements reached all N peers: measured with 64 peers in one process,
        one such wave cost 30 s of CPU, and rounds stopped merging (see the README).
        """
        runtime, node = self._runtime(), self._node()
        served = state if not self.config.attack else poison(
            state, self.config.attack, scale=self.config.attack_scale, seed=self.version)
        data = await trio.to_thread.run_sync(encode_adapter, served)
        offer = node.offer(self.version, runtime.trainer.samples, data,
                           digest=await trio.to_thread.run_sync(digest, data))
        # The encoding is deterministic: a neighbour's adapter has exactly our size, unless
        # ranks may differ (`product`: up to MAX_RANK_FACTOR x ours, plus a header's slack).
        node.adapter_sizes = (len(data), len(data)) if not self._rank_free else (
            1, MAX_RANK_FACTOR * len(data) + _HEADER_SLACK)
        announcement = Announcement(
            swarm=runtime.swarm, peer=node.peer_id, version=self.version,
            samples=runtime.trainer.samples, digest=offer.digest, nbytes=len(data),
            train_loss=self.last_train_loss, addrs=tuple(node.listen_addrs),
        )
        if node.current is None:
            try:
                await node.publish(announcement)
            except GossipError as exc:  # it is `current`: the re-announcement retries it
                logger.warning("first announcement failed (%s); the next re-announcement "
                               "retries it", exc)
        else:
            node.update(announcement)

    def _merge_inputs(self, accepted: list[Contribution]) -> list[Contribution]:
        if not self._buffered:
            return accepted
        for contribution in accepted:
            self._buffer.put(contribution, now=self.version)
        buffered = self._buffer.contributions(now=self.version)
        if not accepted or len(buffered) < self._min_buffered:
            # A median of self and two neighbours is decided by the neighbours when both are
            # bad: measured with 2 attackers among 8 peers, honest loss 7.4 against 3.06 clean.
            logger.info("%s waits for %d buffered neighbours before merging (has %d)",
                        self.config.merge.rule, self._min_buffered, len(buffered))
            return []
        return buffered

    def _train(self) -> float:
        return self._runtime().trainer.train_round(self._stop)

    async def _gather(self, own: dict[str, Any]) -> list[Contribution]:
        """Fetch from `fanout` random live neighbours; keep the adapters that validate.

        A neighbour that fails (unreachable, busy, timed out, rejected, untrained) is replaced
        by another live one drawn at random, in up to `_GATHER_WAVES` waves, so that a round
        merges `fanout` adapters whenever enough neighbours answer. Each wave is bounded by
        `--fetch-timeout`. Neighbours that had not trained yet are then waited for.
        """
        view, wanted = self._view(), self.config.topology.fanout
        view.expire(trio.current_time())
        self._scale = await trio.to_thread.run_sync(self._reference.scale, own)
        self._accepted_norms = []  # `validate_update` measures each as it accepts it
        accepted: list[Contribution] = []
        untrained: list[Announcement] = []
        tried: set[str] = set()
        for wave in range(_GATHER_WAVES):
            missing = wanted - len(accepted)
            if missing <= 0:
                break
            # Each wave draws twice as many as are missing: when most of the view is identities
            # that never serve (a sybil flood), later waves still reach an honest neighbour.
            drawn = view.sample(missing << wave, self.rng, trio.current_time(), exclude=tried)
            chosen = [self._latest[info.peer_id] for info in drawn if info.peer_id in self._latest]
            if not chosen:
                break
            tried.update(announcement.peer for announcement in chosen)
            await self._fetch_all(chosen, own, accepted, untrained)
        self._tried = sorted(tried)
        if untrained and len(accepted) < wanted:
            await self._await_training(untrained, own, accepted)
        self._reference.update(self._accepted_norms)
        return accepted

    async def _await_training(self, untrained: list[Announcement], own: dict[str, Any],
                              accepted: list[Contribution]) -> None:
        """Fetch neighbours that had not trained yet again, backing off, for `--fetch-timeout`
        or as long as our own training took, whichever is longer.

        Peers that start together finish their first round at different times, on a shared CPU
        up to a whole training round apart, and the first to finish found only untrained
        neighbours: measured with 64 peers in one process, 19 of them merged nothing in round 1.
        """
        wanted = self.config.topology.fanout
        patience = max(self.config.network.fetch_timeout_s, self._train_s)
        deadline = trio.current_time() + patience
        delay, started = _PATIENCE_FIRST_S, trio.current_time()
        while untrained and len(accepted) < wanted and trio.current_time() + delay < deadline:
            await trio.sleep(delay)
            delay *= 2
            missing = wanted - len(accepted)
            chosen, untrained = untrained[:missing], untrained[missing:]
            await self._fetch_all(chosen, own, accepted, untrained)
        logger.info("waited %.1f s for neighbours to train; %d of %d merged",
                    trio.current_time() - started, len(accepted), wanted)

    async def _fetch_all(self, chosen: list[Announcement], own: dict[str, Any],
                         accepted: list[Contribution], untrained: list[Announcement]) -> None:
        async with trio.open_nursery() as nursery:
            for announcement in chosen:
                nursery.start_soon(self._fetch_one, announcement, own, accepted, untrained)

    async def _fetch_one(self, announcement: Announcement, own: dict[str, Any],
                         accepted: list[Contribution], untrained: list[Announcement]) -> None:
        runtime, node = self._runtime(), self._node()
        try:
            fetched = await node.fetch(announcement)
        except (TransferError, WireError) as exc:  # the node counted it: one owner per counter
            logger.info("no adapter from %s this round: %s", announcement.peer, exc)
            self._judge(announcement.peer, exc.reason)
            return
        self.adapters_received += 1
        self._view().observe(announcement.peer, trio.current_time())  # it answered: alive
        if fetched.samples == 0 and runtime.trainer.samples > 0:
            # A neighbour that has not finished its first round serves the seeded adapter,
            # which would merge with weight 0: try another one, or it again later.
            logger.debug("%s has not trained yet; not merged", announcement.peer)
            untrained.append(announcement)
            return
        try:
            # Decoding and checking megabytes off the event loop, which keeps serving meanwhile.
            state, norm = await trio.to_thread.run_sync(self._decode, fetched.data, own)
        except (WireError, RejectedUpdate) as exc:
            self.rejected[exc.reason] += 1
            logger.warning("rejected adapter from %s: %s", announcement.peer, exc)
            self._judge(announcement.peer, exc.reason)
            return
        self._membership().trust(announcement.peer)
        self._accepted_norms.append(norm)
        age = max(0, self.version - fetched.version)
        accepted.append(Contribution(state=state, samples=fetched.samples, age=age,
                                     peer=announcement.peer))

    def _judge(self, peer: str, reason: str) -> None:
        """Drop a neighbour that served invalid bytes; draw one the network failed after others.

        A busy answer costs nothing. Identities are free: one that never serves must sink to
        the end of the draw, but an honest peer on a loaded machine times out too, so a
        network failure keeps its place in the view.
        """
        membership = self._membership()
        if reason in _BUSY:
            return
        if reason in _NETWORK:
            membership.failed(peer)
            return
        logger.info("%s dropped from the view (%s)", peer, reason)
        membership.distrust(peer)

    def _decode(self, data: bytes, own: dict[str, Any]) -> tuple[dict[str, Any], float]:
        """Decode a fetched adapter and validate it against ours (in a worker thread).

        Returns:
            The state and its norm, which feeds the norm reference.
        """
        state = decode_adapter(data, max_bytes=self.config.network.max_adapter_bytes)
        norm = validate_update(own, state, self.config.merge, allow_rank_change=self._rank_free,
                               reference=self._scale)
        return state, norm

    async def _listen(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Run `gossip.membership.Membership` on our view: announcements, liveness, dialling."""
        membership = Membership(self._node(), self.config.topology, self.rng,
                                view=self._view(), announcements=self._latest)
        self.membership = membership
        await membership.run(task_status=task_status)

    async def _evaluate(self, *, record: bool) -> None:
        runtime = self._runtime()
        self.last_eval = await trio.to_thread.run_sync(
            runtime.trainer.eval_loss, runtime.eval_batches
        )
        if record:
            state = self._runtime().trainer.state()
            self._runtime().store.append_metrics(self._metrics(None, 0, evaluated=True,
                                                               state=state))

    async def _persist(self, state: dict[str, Any], loss: float | None, merged: int, *,
                       evaluated: bool) -> None:
        """Checkpoint and log the round; `state` is a copy of the adapter as it is now.

        The records are taken here, on the event loop; hashing them into a sketch, writing and
        fsyncing run in a worker thread, so that serving neighbours never waits on the disk.
        """
        runtime = self._runtime()
        checkpoint = self._checkpoint(state)
        record = self._metrics(loss, merged, evaluated=evaluated, state=None)
        status = self.status()

        def write() -> None:
            runtime.store.save_checkpoint(checkpoint)
            runtime.store.append_metrics({**record, **_shape_of(state)})
            runtime.store.write_status(status)

        await trio.to_thread.run_sync(write)

    def _persist_final(self, status: dict[str, Any] | None) -> None:
        """Final checkpoint, export and status (taken on the event loop), in a worker thread."""
        if self.runtime is None:
            return
        self._save_checkpoint()
        trainer = self.runtime.trainer
        self.runtime.store.export(trainer.model, trainer.adapter)
        if status is not None:
            self.runtime.store.write_status(status)
        logger.info("final checkpoint and export written to %s", self.runtime.store.root)

    def _save_checkpoint(self, state: dict[str, Any] | None = None) -> None:
        self._runtime().store.save_checkpoint(self._checkpoint(state))

    def _checkpoint(self, state: dict[str, Any] | None) -> Checkpoint:
        runtime = self._runtime()
        return Checkpoint(
            state=runtime.trainer.state() if state is None else state, version=self.version,
            samples=runtime.trainer.samples, round=self.round, swarm=runtime.swarm_hex,
            counters=self._totals(),
        )

    def _metrics(self, loss: float | None, merged: int, *, evaluated: bool,
                 state: dict[str, Any] | None = None) -> dict[str, Any]:
        """One metrics line; with `state`, its sketch and norm too (see `_shape_of`)."""
        record = {
            "round": self.round, "version": self.version,
            "samples": self._runtime().trainer.samples,
            "train_loss": loss, "eval_loss": self.last_eval if evaluated else None,
            "merged": merged, **self._totals(),
            "peers_live": len(self._view().live(trio.current_time())),
            "tried": self._tried,
            "ts": time.time(),
        }
        return record if state is None else {**record, **_shape_of(state)}

    def status(self) -> dict[str, Any]:
        """The status.json document: what this peer is and how it is doing."""
        runtime, node = self._runtime(), self._node()
        return {
            "peer_id": node.peer_id, "listen_addrs": node.listen_addrs, "topic": node.topic,
            "swarm_id": runtime.swarm_hex, "model": str(runtime.model_dir),
            "round": self.round, "version": self.version, "samples": runtime.trainer.samples,
            **{k: v for k, v in self._totals().items() if k != "t"},
            "peers_known": len(self._view()), "peers_connected": len(node.connected_peers()),
            **self._view_status(),
            # What we refused from others (the node counts transfers, we count decoding and
            # validation: disjoint), and the uploads our server refused, by reason.
            "rejected": dict(self.rejected + node.rejected),
            "uploads_refused": dict(node.server.refused),
            "eval_loss": self.last_eval, "updated": time.time(),
        }

    def _view_status(self) -> dict[str, Any]:
        """Who is in the view: live ids (at most `--view-size`), trusted and refused counts."""
        stats = self._view().statistics(trio.current_time())
        return {"live_peers": [info.peer_id for info in self._view().live(trio.current_time())],
                "peers_trusted": stats.trusted, "peers_refused": stats.refused}

    def _resume_counters(self, counters: Mapping[str, float]) -> None:
        """Continue the totals a restarted peer reports from those its checkpoint kept."""
        self.merges = int(counters.get("merges", 0))
        self.adapters_received = int(counters.get("adapters_received", 0))
        self._before = {k: counters.get(k, 0.0) for k in ("bytes_in", "bytes_out", "t")}

    def _totals(self) -> dict[str, Any]:
        """Merges, adapters received, bytes each way and seconds run, over every restart."""
        node, before = self._node(), self._before
        return {
            "merges": self.merges, "adapters_received": self.adapters_received,
            "bytes_in": int(before.get("bytes_in", 0)) + node.bytes_in,
            "bytes_out": int(before.get("bytes_out", 0)) + node.server.bytes_out,
            "t": round(before.get("t", 0.0) + time.monotonic() - self._started, 3),
        }

    def _can_report(self) -> bool:
        return self.runtime is not None and self.node is not None and self.view is not None

    def _write_status(self) -> None:
        if self._can_report():
            self._runtime().store.write_status(self.status())

    def _runtime(self) -> Runtime:
        assert self.runtime is not None, "the peer is not loaded yet"
        return self.runtime

    def _node(self) -> GossipNode:
        assert self.node is not None, "the peer has no network node yet"
        return self.node

    def _membership(self) -> Membership:
        assert self.membership is not None, "the peer has no membership service yet"
        return self.membership

    def _view(self) -> MembershipView:
        assert self.view is not None, "the peer has no membership view yet"
        return self.view


def _shape_of(state: dict[str, Any]) -> dict[str, Any]:
    """A 64-number sketch and the norm instead of the adapter: enough to measure consensus."""
    return {"sketch": [float(f"{x:.6g}") for x in sketch(state)],
            "norm": float(f"{adapter_norm(state):.6g}")}

"""The peer daemon: one nursery that owns the network node and the round loop.

One round, as in DESIGN.md:
  1. train `steps_per_round` steps in a worker thread (the event loop keeps serving);
  2. serve the new adapter and describe it in a signed announcement (`peer.publish`);
  3. fetch `fanout` random live neighbours' adapters and validate them (`peer.gather`);
  4. merge self + accepted neighbours with the configured rule and swap the result in;
  5. evaluate, checkpoint atomically, append a metrics line, rewrite status.json.

After `rounds` training rounds, `settle_rounds` more rounds skip step 1: they only exchange and
merge, which pulls the peers' adapters together, so the swarm ends close to one adapter
instead of N slightly different ones. They fetch `settle_fanout` neighbours (training costs them
nothing, so more fetches fit) and step the public estimate with the settle codec (int8 under
`sign`: sign steps left each peer a residual that kept the swarm apart). Each lasts as long as
the last training round, so that neighbours have merged in between; peers of one process, which
drift apart in time behind their shared model lock, settle in lock step behind a `RoundGate`
instead (`peer.gate`).
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import trio

from gossip.node import GossipNode
from merge.rules import merge_estimates
from merge.types import AdapterState, Contribution
from peer.config import PeerConfig
from peer.gate import RoundGate
from peer.inputs import MergeInputs
from peer.logs import PEER_LOG_FIELDS
from peer.parts import NodeFactory, Parts, assemble
from peer.setup import Runtime, build_runtime
from peer.shared import SharedModel, settle_turn, take_turn
from peer.stats import PeerStatistics
from peer.web import serve_peer_http

logger = logging.getLogger(__name__)


class Peer:
    """A loraswarm peer. `run` returns after `config.total_rounds` rounds, or when cancelled."""

    def __init__(self, config: PeerConfig, shared: SharedModel | None = None, *,
                 node_factory: NodeFactory = GossipNode, gate: RoundGate | None = None) -> None:
        self.config = config
        self.shared = shared  # a base model shared with other peers of this process
        self.node_factory = node_factory
        self.gate = gate  # settling rounds in lock step with the other peers of this process
        self.runtime: Runtime | None = None  # set by `load`, or by a test before `run`
        self.parts: Parts | None = None  # once loaded: the node and what uses it
        self.rng = random.Random()
        self.stats = PeerStatistics()
        self.round = 0
        self.completed = 0  # rounds whose checkpoint and metrics line are on disk
        self.version = 0
        self._inputs = MergeInputs(config.merge)
        self._stop = threading.Event()
        self._round_done = trio.Event()
        self._scope = trio.CancelScope()  # `crash` cancels it
        self._crashed = False
        self._training_round_s = 0.0  # how long the last training round took (paces settling
        # without a gate)
        self._train_s = 0.0  # how long its training took (how long to wait for neighbours)
        self._fetched_at = 0.0  # when the last round's fetches had all ended
        self._budget_told = False  # said once in the log that the ε budget is spent

    async def load(self) -> Runtime:
        """Load model, data and checkpoint, not joining yet: a process's peers then join at once."""
        self.runtime = await trio.to_thread.run_sync(build_runtime, self.config, self.shared)
        return self.runtime

    async def wait_rounds(self, rounds: int) -> None:
        """Return once this peer has finished `rounds` rounds (for tests and embedders)."""
        while self.completed < rounds:
            await self._round_done.wait()

    def crash(self) -> None:
        """Stop at once, as a killed process would: no final checkpoint, export or status."""
        self._crashed = True
        self._scope.cancel()

    def request_stop(self) -> None:
        """Ask the training thread to return at its next step boundary (signal handlers)."""
        self._stop.set()

    def training(self) -> bool:
        """Whether the next round trains: every round but the settling ones after `rounds`,
        and none once the privacy budget is spent (the peer then settles: it keeps serving
        and merging)."""
        if self.config.rounds and self.round >= self.config.rounds:
            return False
        runtime = self.runtime
        if runtime is None or runtime.trainer.can_train():
            return True
        if not self._budget_told:
            self._budget_told = True
            ledger = runtime.trainer.ledger
            logger.warning("privacy budget spent: ε = %.3g of %g after %d steps; training "
                           "stops, this peer keeps serving and merging", ledger.epsilon(),
                           self.config.privacy.epsilon, ledger.steps)
        return False

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Load (unless `load` ran), join the swarm, signal readiness with the node, run rounds."""
        runtime = self.runtime or await self.load()
        if runtime.resumed is not None:
            self.version = runtime.resumed.version
            self.round = self.completed = runtime.resumed.round
            self.stats = PeerStatistics.resumed(runtime.resumed.counters)
        parts = self.parts = assemble(self.config, runtime, self.stats, self.rng,
                                      self.node_factory)
        # Our tasks and worker threads inherit this: their log lines name us and our round.
        PEER_LOG_FIELDS.set(lambda: {"peer_id": parts.node.peer_id, "round": self.round})
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    await nursery.start(parts.node.run)
                    await nursery.start(parts.membership.run)
                    if self.config.http:
                        parts.records.http = await nursery.start(
                            serve_peer_http, self, self.config.http)
                    runtime.store.write_status(self.status())
                    task_status.started(parts.node)
                    with self._in_gate():
                        await self._rounds()
                    await self._linger()
                    nursery.cancel_scope.cancel()
        finally:
            if not self._crashed:
                with trio.CancelScope(shield=True):
                    # The export takes a shared model's lock: wait in its threads, not trio's.
                    await take_turn(self.shared, partial(
                        parts.records.save_final, self.status(), round_=self.round,
                        version=self.version))

    def status(self) -> dict[str, Any]:
        """The status.json document: what this peer is and how it is doing."""
        return self._parts().records.status(round_=self.round, version=self.version)

    async def _rounds(self) -> None:
        await self._start()
        total = self.config.total_rounds
        while not total or self.round < total:
            settling = not self.training()
            if settling and self.gate is not None:
                await self.gate.wait_for(self.completed)  # every peer of the process is here
            started = trio.current_time()
            await self._one_round()
            if self._stop.is_set():
                return
            took = trio.current_time() - started
            if self.gate is not None:
                self.gate.finished(self, self.completed, took)
            if not settling:
                self._training_round_s = took
            pause = self._pause(settling, took)
            if pause > 0:
                await trio.sleep(pause)

    def _pause(self, settling: bool, took: float) -> float:
        """Seconds to wait before the next round, after a round that took `took` s."""
        pause = self.config.round_pause_s
        if self.gate is None and settling:
            # Unpaced, a settling round fetches adapters its neighbours have not merged since,
            # and consensus stalls; as long as a training round, it lets them move.
            return max(pause, self._training_round_s - took)
        if self.gate is not None and self.round != self.config.total_rounds and (
                not self.training()):
            # Behind a gate the next round waits until every neighbour has merged, but a
            # neighbour refuses a second fetch within its upload interval ("rate_limited":
            # 6-peer settling rounds of 0.05 s then merged nothing).
            return max(pause, self._fetched_at - trio.current_time()
                       + self.config.network.min_upload_interval_s)
        return pause

    async def _start(self) -> None:
        """Wait for the swarm to form, announce ourselves, and evaluate where we start from."""
        parts = self._parts()
        runtime, publisher = parts.runtime, parts.publisher
        # A joiner announces itself before it waits for --wait-peers others: two joiners that
        # each waited to hear of the other first would never hear of each other. The peer that
        # starts the swarm waits first, so that its announcement reaches those it waited for.
        joiner = bool(self.config.network.bootstrap)
        if self.round == 0 and not joiner:
            await publisher.wait_for_peers()
        if self.version == 0:
            # Tell the swarm before round 1 that we are here (serving the seeded adapter): sent
            # after round 1's training, it reached the neighbours too late for their round 1.
            # A restarted peer announces after its next round, as before its crash.
            await publisher.wait_for_topic_peer()
            await publisher.announce(runtime.trainer.state(), version=self.version,
                                     round_=self.round)
        if self.round == 0 and joiner:
            await publisher.wait_for_peers()
        if self.round == 0 and runtime.eval_batches:
            await self._evaluate(runtime)
            runtime.store.append_metrics(parts.records.metrics(
                round_=0, version=self.version, loss=None, merged=0, evaluated=True, tried=[],
                state=runtime.trainer.state()))

    async def _one_round(self) -> None:
        parts, stats = self._parts(), self.stats
        runtime = parts.runtime
        self._stop.clear()
        loss: float | None = None
        train_s: float | None = None
        started, training = trio.current_time(), self.training()
        if training:
            loss = stats.last_train_loss = await take_turn(self.shared, self._train, runtime)
            train_s = self._train_s = trio.current_time() - started
            stats.train_s += train_s
        self.version += 1
        state = runtime.trainer.state()
        await parts.publisher.announce(state, version=self.version, round_=self.round + 1,
                                       settling=not training)
        if not training and self.gate is not None:
            # Fetch only once every peer of the process serves what it merged last round.
            self.gate.announced(self, self.round + 1)
            await self.gate.wait_announced(self.round + 1)
        gather_started = trio.current_time()
        async with settle_turn(self.shared, settling=not training):
            state, merged, tried = await self._exchange(state, training=training)
        stats.merges += merged
        gather_s = self._fetched_at - gather_started
        self.round += 1
        last = self.round == self.config.total_rounds  # the final adapter is always evaluated
        evaluated = bool(runtime.eval_batches) and (
            self.round % self.config.eval_every == 0 or last)
        if evaluated:
            await self._evaluate(runtime)
        await parts.records.save_round(state, round_=self.round, version=self.version, loss=loss,
                                       merged=merged, evaluated=evaluated,
                                       tried=tried, train_s=train_s, gather_s=gather_s,
                                       round_s=trio.current_time() - started)
        self.completed = self.round
        self._round_done.set()
        self._round_done = trio.Event()

    async def _exchange(self, state: AdapterState, *, training: bool,
                        ) -> tuple[AdapterState, int, list[str]]:
        """Gather neighbours' adapters and merge them into `state`: the merged state, how many
        adapters it took, and the neighbours asked. Nothing of theirs outlives the call."""
        parts = self._parts()
        runtime = parts.runtime
        found = await parts.gatherer.gather(state, version=self.version,
                                            trained=runtime.trainer.samples > 0,
                                            patience_s=self._train_s, settling=not training)
        self._fetched_at = trio.current_time()
        others = self._inputs.choose(found.accepted, version=self.version)
        if others:
            own = Contribution(state=state, samples=runtime.trainer.samples)
            # The merge returns a fresh copy, so it also feeds the checkpoint and the sketch.
            state = await trio.to_thread.run_sync(merge_estimates, own,
                                                  parts.publisher.public_estimate(), others,
                                                  self.config.merge)
            runtime.trainer.load_state(state)
        return state, len(found.accepted), found.tried

    def _train(self, runtime: Runtime) -> float:
        """One round's steps, then their ledger on disk before the adapter is served (blocks)."""
        loss = runtime.trainer.train_round(self._stop)
        runtime.store.save_ledger(runtime.trainer.ledger.to_json())
        return loss

    async def _evaluate(self, runtime: Runtime) -> None:
        self.stats.last_eval = await take_turn(self.shared, runtime.trainer.eval_loss,
                                               runtime.eval_batches)

    async def _linger(self) -> None:
        """Serve the final adapter `--linger` s more, for slower neighbours (not after a signal)."""
        if self.config.linger_s and not self._stop.is_set():
            logger.info("all %d rounds done; serving the final adapter for %.0f s",
                        self.round, self.config.linger_s)
            await trio.sleep(self.config.linger_s)

    @contextmanager
    def _in_gate(self) -> Iterator[None]:
        """Be a member of the gate while the rounds run: one that stops, crashes or is done
        leaves it, so that the others never wait for it."""
        if self.gate is None:
            yield
            return
        self.gate.join(self, self.completed)
        try:
            yield
        finally:
            self.gate.leave(self)

    def _parts(self) -> Parts:
        assert self.parts is not None, "the peer has not joined yet"
        return self.parts

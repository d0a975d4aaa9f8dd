"""An in-memory network and a model-free trainer, to run the round logic on trio's virtual clock.

`FakeNetwork.node` is a `Peer(node_factory=...)`: every node hears every publish and can fetch
every other node's offer, after `fetch_s` virtual seconds. `FakeTrainer` trains a 4-number
adapter; each round takes `train_s` virtual seconds. No libp2p, no language model, no real sleep.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from gossip.compress import Codec, payload_shapes
from gossip.config import NodeConfig
from gossip.errors import TransferError
from gossip.estimate import PublicEstimate, decode_update, encode_update
from gossip.fetcher import link_stats
from gossip.node import Heard, Received
from gossip.reachability import UNKNOWN, Reachability
from gossip.replicas import EstimateReplica, Replicas
from gossip.transfer import Offer
from gossip.wire import Announcement
from gossip.wire import digest as sha256
from peer.privacy import Ledger, PrivacyConfig
from peer.setup import Runtime
from peer.store import PeerStore

NAMES = ("layer.lora_A.weight", "layer.lora_B.weight")


def fake_peer_id() -> str:
    return str(ID.from_pubkey(create_new_key_pair().public_key))


@dataclass
class _Server:
    refused: Counter[str] = field(default_factory=Counter)
    served_kinds: Counter[str] = field(default_factory=Counter)
    bytes_out: int = 0
    current: Offer | None = None


class FakeNode:
    """What a `Peer` and its `Membership` use of a `GossipNode`, in memory."""

    def __init__(self, network: FakeNetwork, config: NodeConfig, swarm: bytes) -> None:
        self.network, self.config, self.swarm = network, config, swarm
        self.peer_id = fake_peer_id()
        self.topic = "fake"
        self.listen_addrs = [f"/ip4/127.0.0.1/tcp/1/p2p/{self.peer_id}"]
        self.announce_addrs = self.listen_addrs
        self.current: Announcement | None = None
        self.published_at = -math.inf
        self.rejected: Counter[str] = Counter()
        self.bytes_in = 0
        self.links = link_stats(config)
        self.server = _Server()
        self.replicas = Replicas(cap_bytes=config.max_adapter_bytes)  # unused: keyframes only
        self.adapter_shapes: dict[str, tuple[int, int]] | None = None
        self.offered: Offer | None = None
        self.up = True  # a node that is down refuses every fetch
        self.busy = 0  # the next `busy` fetches are refused, as a server with no free slot does
        self._seqno = 0
        self._send, self.announcements = trio.open_memory_channel[Heard](256)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            await trio.sleep_forever()
        finally:
            self.up = False

    def serve(self, offer: Offer) -> Offer:
        self.offered = self.server.current = offer
        return offer

    def offer(self, version: int, samples: int, state: Mapping[str, torch.Tensor]) -> Offer:
        snapshot = PublicEstimate(state, Codec("fp32"), version=version, keep=0).snapshot()
        return self.serve(Offer(version=version, samples=samples, estimate=snapshot))

    def expect_shapes(self, shapes: Any, *, rank_factor: int = 1, origin: Any = None) -> None:
        self.adapter_shapes = dict(shapes)

    async def publish(self, announcement: Announcement) -> None:
        self.update(announcement)
        self.published_at = trio.current_time()
        self._seqno += 1
        for node in self.network.nodes.values():
            if node is not self and node.up:
                node._send.send_nowait(Heard(announcement=announcement, seqno=self._seqno))

    def update(self, announcement: Announcement) -> None:
        self.current = announcement

    async def receive(self, announcement: Announcement) -> Received:
        await trio.sleep(self.network.fetch_s)
        other = self.network.nodes.get(announcement.peer)
        if other is None or not other.up or other.offered is None:
            self.rejected["unreachable"] += 1
            raise TransferError("unreachable", "no such node")
        if other.busy > 0:
            other.busy -= 1
            other.server.refused["busy"] += 1
            raise TransferError("refused", "peer answered busy")
        offer = other.offered
        own = -1 if self.current is None else self.current.version
        self.network.fetched.append((self.peer_id, other.peer_id, own, offer.version))
        data = encode_update(offer.estimate.update_for(None))  # always a keyframe
        self.bytes_in += len(data)
        self.links.record(other.peer_id, len(data), self.network.fetch_s, 0.0)
        other.server.bytes_out += len(data)
        other.server.served_kinds["keyframe"] += 1
        keyframe = offer.estimate.keyframe.payload
        replica = EstimateReplica(payload_shapes(keyframe, max_elements=len(data) * 64),
                                  max_payload_bytes=len(data))
        replica.apply(decode_update(data, max_bytes=len(data)))
        state = replica.estimate
        assert state is not None
        return Received(peer=other.peer_id, version=offer.version, samples=offer.samples,
                        state=state, nbytes=len(data), privacy=offer.privacy)

    @property
    def reachability(self) -> Reachability:
        return Reachability(UNKNOWN, "a fake node has no address to dial back")

    def relay_status(self) -> dict[str, Any]:
        return {}

    def relayed_only(self) -> set[str]:
        return set()

    async def catch_up(self, peer: str) -> int:
        """Every fake node hears every publish: a catch-up has nothing to add."""
        return 0

    def catchup_status(self) -> dict[str, Any]:
        return {"asked": 0, "heard": 0, "failed": 0, "served": {}}

    def connected_peers(self) -> list[str]:
        return [p for p, node in self.network.nodes.items() if node is not self and node.up]

    def topic_peers(self) -> list[str]:
        return self.connected_peers()

    async def dial(self, peer: str) -> None:
        return None

    async def connect(self, addr: str) -> None:
        return None

    def remember(self, peer: str, addrs: Any, *, via: str = "") -> list[str]:
        return list(addrs)

    def forget(self, peer: str) -> None:
        return None


@dataclass
class FakeNetwork:
    """Fully connected fake nodes; fetches take `fetch_s` virtual seconds."""

    fetch_s: float = 0.1
    nodes: dict[str, FakeNode] = field(default_factory=dict)
    # Every fetch: (fetcher, server, the fetcher's announced version, the version served).
    fetched: list[tuple[str, str, int, int]] = field(default_factory=list)

    def node(self, config: NodeConfig, swarm: bytes, identity: Path | None) -> FakeNode:
        node = FakeNode(self, config, swarm)
        self.nodes[node.peer_id] = node
        return node


class FakeTrainer:
    """A 4-number LoRA pair that each round moves by one step; `train_s` virtual s a round."""

    def __init__(self, train_s: float, *, seed: int) -> None:
        self.train_s = train_s
        generator = torch.Generator().manual_seed(seed)
        self._state = {name: torch.rand(2, 2, generator=generator) for name in NAMES}
        self.samples = 0
        self.rounds = 0
        self.model, self.adapter = _FakeModel(), "default"
        self.ledger = Ledger(PrivacyConfig())  # not private: it only counts steps
        self.lr = 1e-3  # what metrics lines report as the next step's rate

    def can_train(self) -> bool:
        return self.ledger.affords(1)

    def train_round(self, stop: threading.Event | None = None) -> float:
        trio.from_thread.run(trio.sleep, self.train_s)  # virtual time passes as in training
        self.ledger.record(1)
        self.rounds += 1
        self.samples += 4
        self._state = {name: tensor * 0.9 for name, tensor in self._state.items()}
        return 1.0 / self.rounds

    def state(self) -> dict[str, torch.Tensor]:
        return {name: tensor.clone() for name, tensor in self._state.items()}

    def load_state(self, state: Any) -> None:
        self._state = {name: state[name].clone() for name in NAMES}

    def eval_loss(self, batches: Any) -> float:
        return float(sum(t.abs().sum() for t in self._state.values()))

    def alone(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()  # one adapter: nothing to isolate


class _FakeModel:
    def save_pretrained(self, folder: Path, **kwargs: Any) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "adapter_model.safetensors").write_bytes(b"fake")


def fake_runtime(folder: Path, *, train_s: float, seed: int) -> Runtime:
    """A loaded peer without a model: a fake trainer and a real store in `folder`."""
    trainer: Any = FakeTrainer(train_s, seed=seed)
    return Runtime(trainer=trainer, eval_batches=[], swarm=sha256(b"fake swarm")[:16],
                   model_dir=folder, store=PeerStore(folder), shapes={}, resumed=None)

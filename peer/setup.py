"""Everything a peer builds before it joins the network: model, data, swarm id, resume point.

This is blocking work (loading weights, tokenizing) and runs in a worker thread.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from gossip.swarm import swarm_hex, swarm_id
from gossip.wire import encode_adapter
from peer.config import PeerConfig
from peer.data import TokenBatches, eval_batches, load_examples
from peer.device import CPU_FLOAT32, Placement, resolve
from peer.errors import ConfigError, DataError, PeerError
from peer.fingerprint import base_fingerprint
from peer.model import attach_lora, load_base, resolve_model
from peer.privacy import check_data, plan
from peer.shared import SharedModel
from peer.store import CHECKPOINT, Checkpoint, PeerStore
from peer.trainer import LocalTrainer

logger = logging.getLogger(__name__)


@dataclass
class Runtime:
    """The loaded pieces of a peer; mutable counters live on the daemon, not here."""

    trainer: LocalTrainer
    eval_batches: list[dict[str, torch.Tensor]]
    swarm: bytes
    model_dir: Path
    store: PeerStore
    shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]
    resumed: Checkpoint | None
    placement: Placement = CPU_FLOAT32  # where the base computes
    # The adapter as the swarm seed draws it, before any checkpoint: every peer of the swarm
    # starts from it, so it is version 0 of every peer's public estimate (publish.py).
    initial: dict[str, torch.Tensor] | None = None

    @property
    def swarm_hex(self) -> str:
        return swarm_hex(self.swarm)


def build_runtime(config: PeerConfig, shared: SharedModel | None = None) -> Runtime:
    """Load the model and data, derive the swarm id, and resume from the last checkpoint.

    Args:
        shared: a base model shared with other peers of this process; this peer then gets its
            own adapter inside it (named after its data folder) instead of loading a model.

    Raises:
        DataError / ModelError / PeerError: one-line problems with the inputs.
    """
    if config.train.threads and shared is None:
        torch.set_num_threads(config.train.threads)
    placement = resolve(config.device)  # refuse what this machine lacks before loading
    examples = load_examples(config.train_path, config.data)
    held_out = load_examples(config.eval_path, config.data) if config.eval_path else []
    # Before the model loads, so that a bad setting is the only line printed. The usable
    # examples are at most these, so δ < 1/len(examples) also holds for them.
    check_data(config.privacy, examples=len(examples), batch_size=config.train.batch_size,
               pack=config.data.pack)
    if shared is None:
        model_dir = resolve_model(config.model)
        logger.info("loading %s on %s", model_dir, placement.describe())
        base, tokenizer = load_base(model_dir, placement)
        model = attach_lora(base, config.lora, config.init_seed, frozen_a=config.train.frozen_a)
        model_print = base_fingerprint(model_dir, placement, tokenizer)
        adapter, lock = "default", None
    else:
        if placement != shared.placement:
            raise ConfigError(
                f"in-process peers share one base, on {shared.placement.describe()}, and this "
                f"peer asks for {placement.describe()}: give every peer the same --device, "
                "--dtype, --quantize and --attention")
        model, tokenizer, lock = shared.model, shared.tokenizer, shared.lock
        model_dir, model_print = shared.model_dir, shared.fingerprint
        adapter = shared.add_adapter(config.data_dir.name, config.lora, config.init_seed,
                                     config.train.frozen_a)
    lora_identity = {**config.lora.to_dict(), "frozen_a": config.train.frozen_a}
    swarm = swarm_id(model_print, lora_identity, config.init_seed)
    batches = TokenBatches(examples, tokenizer, seq_len=config.train.seq_len,
                           batch_size=config.train.batch_size, seed=config.train.data_seed,
                           pack=config.data.pack)
    store = PeerStore(config.data_dir)
    resumed = store.load_checkpoint(swarm_hex(swarm))
    ledger = plan(config.privacy, examples=len(batches), batch_size=config.train.batch_size,
                  steps=config.planned_steps,
                  history=store.load_ledger(resumed))
    if ledger.config.enabled:
        logger.info("%s", ledger.describe())
    trainer = LocalTrainer(model, batches, config.train,
                           samples=resumed.samples if resumed else 0, adapter=adapter, lock=lock,
                           ledger=ledger, own=shared.own[adapter] if shared else None,
                           switch=shared.activate if shared else None,
                           isolate=shared.isolated if shared else None,
                           horizon=config.planned_steps)
    initial = trainer.state()
    if resumed is not None:
        _check_fits(store.root / CHECKPOINT, resumed.state, trainer.state())
        trainer.load_state(resumed.state)
        logger.info("resumed from %s: version %d, %d samples",
                    store.root / CHECKPOINT, resumed.version, resumed.samples)
    state = trainer.state()
    _check_encodable(state)
    return Runtime(
        trainer=trainer,
        eval_batches=eval_batches(held_out, tokenizer, seq_len=config.train.seq_len,
                                  batch_size=config.eval_batch_size) if held_out else [],
        swarm=swarm,
        model_dir=model_dir,
        store=store,
        shapes={k: (tuple(v.shape), v.dtype) for k, v in state.items()},
        resumed=resumed,
        placement=placement,
        initial=initial,
    )


def _check_fits(path: Path, saved: dict[str, torch.Tensor],
                own: dict[str, torch.Tensor]) -> None:
    """Refuse a checkpoint whose tensors are not this adapter's.

    The swarm id covers model and LoRA settings, so this only trips on a checkpoint written
    by another version of loraswarm or edited by hand; resuming part of it would be silent.
    """
    missing = sorted(own.keys() - saved.keys())
    extra = sorted(saved.keys() - own.keys())
    shapes = sorted(k for k in saved.keys() & own.keys()
                    if tuple(saved[k].shape) != tuple(own[k].shape))
    for problem, keys in (("lacks tensors", missing), ("has tensors the model lacks", extra),
                          ("has tensors of other shapes", shapes)):
        if keys:
            raise PeerError(f"{path}: does not fit this model's adapter ({problem}: "
                            f"{', '.join(keys[:3])}); move it away to start over")


def _check_encodable(state: dict[str, torch.Tensor]) -> None:
    if not state:
        raise DataError("the LoRA adapter is empty; check --lora-targets")
    encode_adapter(state)

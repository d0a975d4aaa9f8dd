"""One frozen base model shared by many peers of one process (in-process simulations).

Each peer gets its own named LoRA adapter inside a single peft model: the base weights are in
memory once, and a peer costs only its adapter, its optimizer moments and its token batches.
All adapters start from the same swarm-seeded values, exactly as separate processes would.
Forward passes need their adapter active, so trainers take turns under `lock` (see
`peer.trainer.LocalTrainer`), in worker threads of their own (`take_turn`), not trio's.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
import trio
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict

from merge.types import AdapterState
from peer.device import CPU_FLOAT32, Placement
from peer.errors import ConfigError
from peer.fingerprint import base_fingerprint
from peer.model import LoraSettings, attach_lora, load_base, resolve_model

T = TypeVar("T")
# The per-adapter module dicts of a peft LoRA layer.
_ADAPTER_DICTS = ("lora_A", "lora_B", "lora_dropout")
# Threads that may wait for the shared model's lock at once (see `take_turn`).
WAITING_THREADS = 8
# Peers of one process that gather and merge in a settling round at once (see `settle_turn`).
SETTLING_AT_ONCE = 16


@dataclass
class SharedModel:
    """A peft model with one adapter per in-process peer, and the lock they take turns with."""

    model: Any
    tokenizer: Any
    model_dir: Path
    fingerprint: str
    lora: LoraSettings
    init_seed: int
    frozen_a: bool
    initial: AdapterState
    placement: Placement = CPU_FLOAT32  # where the base computes, for every peer of the process
    lock: threading.Lock = field(default_factory=threading.Lock)
    # The worker threads of passes that take `lock`, apart from trio's 40 (see `take_turn`).
    threads: trio.CapacityLimiter = field(
        default_factory=lambda: trio.CapacityLimiter(WAITING_THREADS))
    # The settling rounds that hold neighbours' adapters at once (see `settle_turn`).
    settling: trio.CapacityLimiter = field(
        default_factory=lambda: trio.CapacityLimiter(SETTLING_AT_ONCE))
    _names: set[str] = field(default_factory=set)
    # Each added adapter's (name, parameter) pairs, found while it was alone (`_alone`).
    own: dict[str, list[tuple[str, torch.nn.Parameter]]] = field(default_factory=dict)
    _layers: list[torch.nn.Module] | None = None

    @classmethod
    def load(cls, model: str | None, lora: LoraSettings, init_seed: int, *,
             frozen_a: bool = False, placement: Placement = CPU_FLOAT32) -> SharedModel:
        """Load the base once, where `placement` says, and attach the seeded initial adapter
        (kept as "default").

        Raises:
            ModelError: the model cannot be resolved or loaded.
        """
        model_dir = resolve_model(model)
        base, tokenizer = load_base(model_dir, placement)
        peft_model = attach_lora(base, lora, init_seed, frozen_a=frozen_a)
        initial = {k: v.detach().clone()
                   for k, v in get_peft_model_state_dict(peft_model).items()}
        print_ = base_fingerprint(model_dir, placement, tokenizer)
        return cls(peft_model, tokenizer, model_dir, print_, lora, init_seed, frozen_a, initial,
                   placement)

    def add_adapter(self, name: str, lora: LoraSettings, init_seed: int,
                    frozen_a: bool) -> str:
        """Add a peer's adapter, equal to the swarm's initial one; returns its name.

        Raises:
            ConfigError: the peer's LoRA settings differ from the shared model's, or the name
                is taken.
        """
        if (lora, init_seed, frozen_a) != (self.lora, self.init_seed, self.frozen_a):
            raise ConfigError("in-process peers must share the LoRA settings, init seed and "
                              "frozen-A mode of the shared model")
        if name in self._names or name == "default":
            raise ConfigError(f"adapter name {name!r} is taken")
        config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=0.0,
                            target_modules=list(lora.target_modules), bias="none",
                            task_type="CAUSAL_LM")
        with self.lock, self._alone(keep={"default", name, *self._active()}):
            # Injecting modules must not race a forward pass (the lock), and peft's add walks
            # every module and parameter of the model: with the other peers' adapters taken
            # out for it, adding the Nth costs what adding the first does (`_alone`).
            self.model.add_adapter(name, config)
            set_peft_model_state_dict(self.model, self.initial, adapter_name=name)
            self.own[name] = [(n, p) for n, p in self.model.named_parameters()
                              if "lora_" in n and f".{name}." in n]
        self._names.add(name)
        return name

    def activate(self, name: str) -> None:
        """Make `name` the adapter forward passes use; call with `lock` held.

        peft's switch walks every adapter of every layer to mark it (un)trainable; the others
        are taken out for it (`_alone`). Theirs stays as it was, which autograd never reads:
        a forward pass goes through the active adapter alone.
        """
        with self._alone(keep={name}):
            self.model.set_adapter(name)

    @contextlib.contextmanager
    def isolated(self, name: str) -> Iterator[None]:
        """Hold `lock` with `name` the only adapter of the model, for a peft call that walks
        every module and the whole state dict (`save_pretrained`, for the export).

        Measured on the memory network: with every adapter present, a peer's final export took
        0.29 s at 256 peers and grew with them (the 1,000-peer run's exports about 1 s each,
        one after another).
        """
        with self.lock, self._alone(keep={name}):
            yield

    def _active(self) -> list[str]:
        active = self.model.active_adapter
        return [active] if isinstance(active, str) else list(active)

    @contextlib.contextmanager
    def _alone(self, keep: set[str]) -> Iterator[None]:
        """For the block, each LoRA layer holds only the adapters in `keep`; adapters added
        meanwhile join the others afterwards.

        Measured on the memory network: with peft's own add, loading the 259th in-process peer
        took 4.6 s (most of it walking the 258 adapters before it), so 1,000 peers would have
        taken the better part of an hour to load.
        """
        saved: list[tuple[torch.nn.Module, str, torch.nn.ModuleDict]] = []
        for layer in self._lora_layers():
            for attr in _ADAPTER_DICTS:
                full = getattr(layer, attr)
                saved.append((layer, attr, full))
                setattr(layer, attr, torch.nn.ModuleDict({k: full[k] for k in full if k in keep}))
        try:
            yield
        finally:
            for layer, attr, full in saved:
                for key, module in getattr(layer, attr).items():
                    if key not in full:
                        full[key] = module
                setattr(layer, attr, full)

    def _lora_layers(self) -> list[torch.nn.Module]:
        if self._layers is None:
            self._layers = [m for m in self.model.modules()
                            if all(isinstance(getattr(m, attr, None), torch.nn.ModuleDict)
                                   for attr in _ADAPTER_DICTS)]
        return self._layers

    def remove_adapter(self, name: str) -> None:
        """Drop a stopped peer's adapter, so that a restarted peer can add its own again.

        Raises:
            ConfigError: no adapter of that name was added.
        """
        if name not in self._names:
            raise ConfigError(f"no in-process adapter named {name!r}")
        with self.lock:
            self.model.delete_adapter(name)
        self._names.discard(name)
        self.own.pop(name, None)


async def take_turn(shared: SharedModel | None, fn: Callable[..., T], *args: Any) -> T:
    """Run `fn(*args)`, blocking work on the model (training, evaluation), in a worker thread.

    With a shared model, the thread comes from the model's own limiter, and waits for `lock`
    there. From trio's default limiter, whose 40 threads every peer of the process shares, the
    waiting peers held them all past 40 peers: the other peers' encoding and hashing for a
    transfer queued behind every pending pass, and with 64 peers fetches timed out (see the
    README). Waiting in trio instead (a limiter of one) handed the model over through the busy
    event loop, and it idled between passes. A few threads (`WAITING_THREADS`) always have the
    next taker waiting at the lock, and 1,000 peers do not park 1,000 threads.
    """
    limiter = shared.threads if shared is not None else None
    return await trio.to_thread.run_sync(fn, *args, limiter=limiter)


@contextlib.asynccontextmanager
async def settle_turn(shared: SharedModel | None, *, settling: bool) -> AsyncIterator[None]:
    """Hold, for the block, one of the process's `SETTLING_AT_ONCE` turns of a settling round.

    Peers settling in lock step (`peer.gate.RoundGate`) start each settling round together,
    and every one of them then held its neighbours' adapters, their decoded updates and a merge
    at once: 256 in-process peers peaked at 4,786 MiB while settling, against 1,835 running
    (README, "Settling together in one process"). With a turn around gathering and merging,
    the neighbours' adapters of at most `SETTLING_AT_ONCE` peers are in memory at once; the
    work is the same, and two cores never ran more than a few of those peers' threads anyway.
    Training rounds take no turn: the model lock spreads them out already, and a peer that
    waits there for neighbours to train must not keep others from merging. Separate processes
    (`shared` None) take none.
    """
    if shared is None or not settling:
        yield
        return
    async with shared.settling:
        yield

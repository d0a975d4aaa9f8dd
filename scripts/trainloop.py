"""The bare peft + torch training loop that `scripts/bench_train.py` measures a peer against,
and the clocks both ways are read with.

`run_bare` is `LocalTrainer`'s step written out (forward, backward, clip to norm 1, AdamW step)
over the peer's model, adapter, batches and optimizer settings: one warm-up round untimed, then
`rounds` rounds of `steps_per_round` steps, each round timed (on a GPU, to the device's end).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from peer.config import PeerConfig
from peer.data import TokenBatches, load_examples
from peer.device import Placement, resolve
from peer.model import attach_lora, load_base, resolve_model


class BenchError(Exception):
    """The benchmark could not run as asked; the message is one line."""


@dataclass(frozen=True)
class Clocks:
    """Wall seconds, this process's CPU seconds, and the calling thread's CPU seconds."""

    wall: float
    process: float
    thread: float

    @classmethod
    def now(cls) -> Clocks:
        return cls(time.perf_counter(), time.process_time(), time.thread_time())

    def __sub__(self, other: Clocks) -> Clocks:
        return Clocks(self.wall - other.wall, self.process - other.process,
                      self.thread - other.thread)

    def core_share(self, cores: int) -> float:
        """How much of `cores` CPUs this process had: below 1, other processes took the rest
        (or, on a GPU, it waited for the device)."""
        return self.process / (self.wall * cores)


@dataclass(frozen=True)
class BareRun:
    seconds: list[float]  # per round's worth of steps
    warmup_loss: float
    tokens: int  # non-padding input tokens of the timed steps (the daemon's timed rounds too)
    clocks: Clocks  # over the timed steps


def run_bare(config: PeerConfig, rounds: int) -> BareRun:
    """The peer's model, adapter, batches and optimizer, stepped in a plain loop."""
    placement = resolve(config.device)
    base, tokenizer = load_base(resolve_model(config.model), placement)
    model = attach_lora(base, config.lora, config.init_seed)
    train = config.train
    texts = load_examples(config.train_path)
    batches = TokenBatches(texts, tokenizer, seq_len=train.seq_len,
                           batch_size=train.batch_size, seed=train.data_seed)
    params = [p for n, p in model.named_parameters() if "lora_" in n]  # LocalTrainer's order
    optimizer = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    model.train()

    def step() -> float:
        batch = batches.next_batch()
        loss = model(**{k: v.to(placement.device) for k, v in batch.items()}).loss
        value = loss.item()
        if not math.isfinite(value):
            raise BenchError("the bare loop's training loss is not finite")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return value

    warmup = [step() for _ in range(train.steps_per_round)]
    seconds, clocks = [], Clocks.now()
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(train.steps_per_round):
            step()
        synchronize(placement)
        seconds.append(time.perf_counter() - started)
    clocks = Clocks.now() - clocks
    tokens = count_tokens(TokenBatches(texts, tokenizer, seq_len=train.seq_len,
                                       batch_size=train.batch_size, seed=train.data_seed),
                          skip=train.steps_per_round, take=rounds * train.steps_per_round)
    return BareRun(seconds, sum(warmup) / len(warmup), tokens, clocks)


def count_tokens(batches: TokenBatches, *, skip: int, take: int) -> int:
    """Non-padding input tokens of batches skip .. skip + take - 1 of a fresh stream."""
    for _ in range(skip):
        batches.next_batch()
    return sum(int(batches.next_batch()["attention_mask"].sum()) for _ in range(take))


def synchronize(placement: Placement) -> None:
    if placement.device.type == "cuda":
        torch.cuda.synchronize(placement.device)

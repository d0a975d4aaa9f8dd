"""Local training of the LoRA factors on a peer's private batches.

`LocalTrainer` is driven from a worker thread (`trio.to_thread.run_sync`) one round at a time;
between rounds the daemon reads and replaces the adapter state on the event-loop thread, so the
swap always happens at a step boundary and no lock is needed.

In-process simulations share one peft model between many trainers, each with its own named
adapter (see `peer.shared`): a shared lock then serialises the forward/backward passes, which
need their adapter to be the active one. Reading and replacing an adapter's values does not
depend on the active adapter, so the event loop never waits for that lock.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from merge.types import AdapterState
from peer.config import TrainConfig
from peer.data import IGNORE_INDEX, TokenBatches, mean_loss
from peer.device import ADAPTER_DTYPE
from peer.dpsgd import clip_rows, noisy_mean, per_example_grads
from peer.privacy import Ledger, PrivacyConfig


class LocalTrainer:
    """Owns the peft model, its optimizer and the peer's batch stream.

    Args:
        model: a peft model whose only trainable parameters are the LoRA factors.
        batches: the private training stream.
        config: steps per round, learning rate.
        samples: training samples already embodied (when resuming from a checkpoint).
        adapter: the name of this trainer's adapter inside `model`.
        lock: held around forward passes when several trainers share `model`.
        ledger: the ε spent on our steps; a private one makes every step a DP-SGD step.
        own: our adapter's (name, parameter) pairs in `model`; None: found by name.
        switch: makes an adapter of `model` the active one (default: peft's `set_adapter`).
        isolate: a context in which our adapter is the only one of `model` (a shared model;
            see `alone`); None: nothing to isolate.
        horizon: the steps `config.lr_schedule` decays over (--rounds x --steps-per-round);
            the ledger's step count, which a restart resumes, says how far along we are.
    """

    def __init__(self, model: Any, batches: TokenBatches, config: TrainConfig,
                 samples: int = 0, *, adapter: str = "default",
                 lock: threading.Lock | None = None, ledger: Ledger | None = None,
                 own: list[tuple[str, torch.nn.Parameter]] | None = None,
                 switch: Callable[[str], None] | None = None,
                 isolate: Callable[[str], contextlib.AbstractContextManager[None]] | None = None,
                 horizon: int = 0) -> None:
        self.model = model
        self.horizon = horizon
        self._isolate = isolate
        self.ledger = ledger if ledger is not None else Ledger(PrivacyConfig())
        # The sample and the noise must be unpredictable to whoever knows the swarm's seeds.
        self._sampler = random.SystemRandom()
        self._noise = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))
        self._last_loss = 0.0
        self.batches = batches
        self.config = config
        self.samples = samples
        self.adapter = adapter
        self._switch = switch if switch is not None else model.set_adapter
        self._lock: contextlib.AbstractContextManager[Any] = lock or contextlib.nullcontext()
        if own is None:  # a shared model knows them: walking it costs every peer's adapters
            own = [(n, p) for n, p in model.named_parameters()
                   if "lora_" in n and f".{adapter}." in n]
        self._params = [p for n, p in own if not (config.frozen_a and "lora_A" in n)]
        self._frozen = [p for n, p in own if config.frozen_a and "lora_A" in n]
        # Our factors under their peft state-dict names (the adapter name taken out), read and
        # written directly: peft's get/set_peft_model_state_dict walk the whole model's state
        # dict, every adapter of a shared model included, on the event-loop thread. With 64
        # in-process peers that was a third of the loop's time (py-spy), growing as N².
        self._named = {n.replace(f".{adapter}.", "."): p for n, p in own}
        self._trainable = {n: p for n, p in own if not (config.frozen_a and "lora_A" in n)}
        self.device = next(p.device for _, p in own) if own else torch.device("cpu")
        self.optimizer = torch.optim.AdamW(
            self._params, lr=config.lr, weight_decay=config.weight_decay
        )

    def alone(self) -> contextlib.AbstractContextManager[None]:
        """A context in which our adapter is the only one of `model`, for peft calls that walk
        the whole model (the export): with a shared model, its lock is held meanwhile."""
        return self._isolate(self.adapter) if self._isolate else contextlib.nullcontext()

    def _activate(self) -> None:
        """Make our adapter the one forward passes use (a no-op with a single adapter)."""
        if self.model.active_adapter != self.adapter:
            self._switch(self.adapter)
            for param in self._frozen:  # set_adapter marks every factor trainable
                param.requires_grad_(False)

    def can_train(self) -> bool:
        """Whether the privacy budget affords another step (always, without one)."""
        return self.ledger.affords(1)

    def train_round(self, stop: threading.Event | None = None) -> float:
        """Run `steps_per_round` optimizer steps; return their mean training loss.

        A private trainer stops early when the next step would exceed its ε budget.

        Args:
            stop: when set (by a signal handler), return after the current step.
        """
        with self._lock:
            self._activate()
            loss = self._train_steps(stop)
        # ε of the steps just taken, cached for the round's status line (on the event loop);
        # outside the lock, which in-process peers share.
        self.ledger.epsilon()
        return loss

    def _train_steps(self, stop: threading.Event | None) -> float:
        self.model.train()
        losses: list[float] = []
        for _ in range(self.config.steps_per_round):
            if losses and stop is not None and stop.is_set():
                break
            if not self.ledger.affords(1):
                break
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr
            if self.ledger.private:
                sample = self.batches.poisson_batch(self.ledger.rate, self._sampler)
                loss = self.private_step(sample)
            else:
                loss = self.step(self.batches.next_batch())
            self.ledger.record(1)
            if loss is not None:
                losses.append(loss)
            self.samples += self.batches.last_examples  # packed rows hold several
        if losses:
            self._last_loss = sum(losses) / len(losses)
        return self._last_loss

    @property
    def lr(self) -> float:
        """The learning rate of our next step: --lr times the schedule's share at it."""
        share = lr_share(self.config.lr_schedule, self.ledger.steps, self.horizon)
        return self.config.lr * share

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        """One (non-private) optimizer step over `batch`; returns its loss."""
        loss = self.accumulate(batch)
        torch.nn.utils.clip_grad_norm_(self._params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def private_step(self, batch: dict[str, torch.Tensor] | None) -> float | None:
        """One DP-SGD step over a Poisson sample `batch` (None: an empty one); returns its mean
        example loss (None for an empty sample, which still takes a step of pure noise).

        The sample is cut into row groups of at most `batch_size / grad_accum` examples, a
        non-private step's micro-batch: a Poisson sample's size is q·N (under
        `--dp-sample-rate`, any size), and per-example gradients of all its rows at once took
        an in-process simulation past 10 GB at 152 rows of the built-in model (killed for
        memory on a 24 GB machine). Each example's gradient is clipped on its own, so the
        groups add up to the same sum. The caller records the step in the ledger.
        """
        ledger, clip = self.ledger, self.ledger.config.clip
        total = {name: torch.zeros_like(p) for name, p in self._trainable.items()}
        losses: list[torch.Tensor] = []
        if batch is not None:
            parts = -(-len(batch["input_ids"]) // self.config.micro_batch)
            params = {name: p.detach() for name, p in self._trainable.items()}
            for part in split_batch(batch, parts):
                grads, part_losses = per_example_grads(
                    self.model, params, {k: v.to(self.device) for k, v in part.items()})
                for name, clipped in clip_rows(grads, clip).items():
                    total[name] += clipped.sum(dim=0)
                losses.append(part_losses)
        expected = ledger.rate * len(self.batches)
        noisy = noisy_mean(total, noise=ledger.noise, clip=clip, expected_batch=expected,
                           generator=self._noise)
        for name, param in self._trainable.items():
            param.grad = noisy[name].to(param.dtype)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if not losses:
            return None
        value = float(torch.cat(losses).mean())
        if not math.isfinite(value):
            raise FloatingPointError("training loss is not finite; lower --lr")
        return value

    def accumulate(self, batch: dict[str, torch.Tensor]) -> float:
        """Add the gradient of `batch`'s loss, in `grad_accum` micro-batches; return the loss.

        Each micro-batch's mean loss is weighted by its share of the batch's labelled tokens,
        so the sum of their gradients is the whole batch's (a token-weighted mean), however
        the tokens fall into the parts: a device short of memory takes the swarm's batch.
        """
        parts = split_batch(batch, self.config.grad_accum)
        tokens = [labelled_tokens(part) for part in parts]
        total = max(sum(tokens), 1)
        loss_sum = 0.0
        for part, count in zip(parts, tokens, strict=True):
            if count == 0:
                continue
            loss = self.model(**{k: v.to(self.device) for k, v in part.items()}).loss
            value = loss.item()  # one device sync per micro-batch
            if not math.isfinite(value):
                raise FloatingPointError("training loss is not finite; lower --lr")
            (loss * (count / total)).backward()
            loss_sum += value * count / total
        return loss_sum

    def state(self) -> AdapterState:
        """A detached CPU copy of the adapter (peft names, no adapter name inside).

        In frozen-A mode (FFA-LoRA) only the B factors are included: every peer's A is the
        swarm-seeded one, so exchanging B alone is complete, averaging it is exact
        (mean(B)·A = mean(B·A)), and the bytes on the wire shrink by A's share.
        """
        return {k: v.detach().to("cpu", ADAPTER_DTYPE, copy=True).contiguous()
                for k, v in self._named.items() if not (self.config.frozen_a and "lora_A" in k)}

    def load_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Replace the adapter's values in place (the optimizer keeps its moments).

        Raises:
            KeyError: `state` names a tensor the adapter lacks (nothing is changed then).
            ValueError: a tensor's shape differs from the adapter's (nothing is changed then).
        """
        unexpected = [k for k in state if k not in self._named]
        if unexpected:
            raise KeyError(f"adapter state has keys the model lacks: {unexpected[:3]}")
        wrong = [k for k, v in state.items() if tuple(v.shape) != tuple(self._named[k].shape)]
        if wrong:
            raise ValueError(f"adapter state has tensors of other shapes: {wrong[:3]}")
        with torch.no_grad():
            for key, value in state.items():
                self._named[key].copy_(value)

    def eval_loss(self, batches: Sequence[dict[str, torch.Tensor]]) -> float:
        """Token-weighted mean loss on held-out batches."""
        with self._lock:
            self._activate()
            return mean_loss(self.model, batches)


def lr_share(schedule: str, step: int, horizon: int) -> float:
    """The share of --lr that step `step` (counted from 0) of a `horizon`-step run takes.

    linear and cosine fall from 1 at step 0 towards 0 at `horizon`; a step at or past it keeps
    the last step's share, so a peer that trains on (restarted with more rounds, or with none
    given) never stalls at a rate of 0 (a DP step would spend ε for nothing).
    """
    if schedule == "constant" or horizon < 1:
        return 1.0
    done = min(step, horizon - 1) / horizon
    if schedule == "linear":
        return 1.0 - done
    return 0.5 * (1.0 + math.cos(math.pi * done))


def split_batch(batch: dict[str, torch.Tensor], parts: int) -> list[dict[str, torch.Tensor]]:
    """Cut a right-padded batch into `parts` row groups, each trimmed to its longest row."""
    if parts == 1:
        return [batch]
    groups = [dict(zip(batch, rows, strict=True))
              for rows in zip(*(torch.tensor_split(v, parts) for v in batch.values()),
                              strict=True)]
    return [_trim(group) for group in groups]


def _trim(group: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    width = int(group["attention_mask"].sum(dim=1).max())
    return {k: v[:, :width] for k, v in group.items()}


def labelled_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens the causal-LM loss averages over (position t predicts token t + 1)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

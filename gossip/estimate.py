"""Public estimates with error feedback (CHOCO-gossip): what a peer's neighbours hold of it.

Each peer publishes an estimate x̂ of its adapter x and moves it only by compressed steps:

    q = Q(x - x̂)            (the wire codec: bf16, int8, topk, ...)
    x̂ <- x̂ + decode(q)      (the *decoded* q, from the very bytes sent)

The residual x - x̂ is never dropped: the next step compresses it again, so what a lossy codec
misses now is sent later (nothing is lost, only delayed). Because x̂ moves by decoded bytes and a
float32 add, every receiver that holds x̂ at some version and applies the same steps rebuilds the
same tensors bit for bit.

**What names a version.** Version v of a peer's estimate is the pair (v, estimate_digest(x̂_v)),
where `estimate_digest` is the sha256 of the canonical float32 safetensors bytes of x̂_v
(`gossip.codec.encode_adapter`: sorted names, no metadata). It is independent of the codec, so a
peer signs (version, digest) once and a receiver checks it whatever route (keyframe, or any chain
of deltas) brought it there. An `EstimateStep` names its base (the version it applies to; -1 for
a keyframe) and its target; a chain is accepted only when it starts at the version the receiver
holds, links step to step, and rebuilds exactly the target digest of its last step.

A server (`PublicEstimate`) keeps its last `keep` steps, at most `max_history_bytes` of
payloads, and answers "I hold (v, d)" with the steps since v, or a float32 keyframe when v is
gone, unknown, or the chain would not be smaller. A receiver
(`gossip.replicas.EstimateReplica`) applies either atomically; a rejection leaves its
estimate as it was and makes it ask for a keyframe next.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import msgpack
import torch

from gossip.codec import encode_adapter
from gossip.compress import Codec, shapes_of
from gossip.errors import WireError

DIGEST_BYTES = 32
NO_DIGEST = b"\0" * DIGEST_BYTES
MAX_VERSION = 2**53
MAX_CHAIN = 64
UPDATE_MAGIC = b"LSE1"

State = dict[str, torch.Tensor]
_MSGPACK_ERRORS = (ValueError, TypeError, msgpack.UnpackException)


def estimate_digest(state: Mapping[str, torch.Tensor]) -> bytes:
    """The sha256 that names an estimate: over `encode_adapter` of its float32 tensors."""
    if any(t.dtype != torch.float32 for t in state.values()):
        raise ValueError("an estimate holds float32 tensors only")
    return hashlib.sha256(encode_adapter(state)).digest()


@dataclass(frozen=True)
class EstimateStep:
    """One move of a public estimate: base (version, digest) -> target (version, digest).

    A keyframe has base_version -1 and base_digest `NO_DIGEST`; its payload decodes to the whole
    estimate instead of a step added to it. `payload` is the codec's bytes (`gossip.compress`).
    """

    base_version: int
    base_digest: bytes
    version: int
    digest: bytes
    payload: bytes

    def __post_init__(self) -> None:
        if not (type(self.base_version) is int and -1 <= self.base_version < MAX_VERSION):
            raise WireError("bad_field", f"base version {self.base_version!r}")
        if not (type(self.version) is int and self.base_version < self.version <= MAX_VERSION):
            raise WireError("bad_field", f"version {self.version!r} after {self.base_version}")
        for name in ("base_digest", "digest"):
            value = getattr(self, name)
            if type(value) is not bytes or len(value) != DIGEST_BYTES:
                raise WireError("bad_field", f"{name} is not {DIGEST_BYTES} bytes")
        if self.is_keyframe != (self.base_digest == NO_DIGEST):
            raise WireError("bad_field", "a keyframe, and only a keyframe, has no base digest")
        if type(self.payload) is not bytes or not self.payload:
            raise WireError("bad_field", "the payload is not non-empty bytes")

    @property
    def is_keyframe(self) -> bool:
        """Whether this step carries the whole estimate."""
        return self.base_version == -1

    @property
    def base(self) -> tuple[int, bytes]:
        """(base_version, base_digest)."""
        return self.base_version, self.base_digest

    @property
    def target(self) -> tuple[int, bytes]:
        """(version, digest) of the estimate this step leads to."""
        return self.version, self.digest


def check_chain(steps: Sequence[EstimateStep], *, max_steps: int = MAX_CHAIN) -> None:
    """A chain is 1..max_steps steps, each based on the previous one's target; only the first
    may be a keyframe.

    Raises:
        WireError: "bad_field" for a broken chain.
    """
    if not 1 <= len(steps) <= max_steps:
        raise WireError("bad_field", f"a chain of {len(steps)} steps, 1..{max_steps} expected")
    for before, after in zip(steps, steps[1:], strict=False):
        if after.base != before.target:
            raise WireError("bad_field",
                            f"the step to {after.version} is not based on {before.version}")


def encode_update(steps: Sequence[EstimateStep]) -> bytes:
    """``UPDATE_MAGIC + msgpack [[base_version, base_digest, version, digest, payload], ...]``.

    An empty list says "you are up to date" (the transfer header still names the version).
    """
    if steps:
        check_chain(steps, max_steps=len(steps))
    rows = [[s.base_version, s.base_digest, s.version, s.digest, s.payload] for s in steps]
    return UPDATE_MAGIC + msgpack.packb(rows, use_bin_type=True)


def decode_update(data: bytes, *, max_bytes: int,
                  max_steps: int = MAX_CHAIN) -> tuple[EstimateStep, ...]:
    """Decode an untrusted update (a keyframe, or a chain of steps) and check that it links.

    The payloads are only sliced out here: `EstimateReplica.apply` decodes them against our
    shapes and checks the digest they rebuild.

    Raises:
        WireError: with the reason of the rejection.
    """
    if not isinstance(data, bytes | bytearray):
        raise WireError("malformed", f"expected bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise WireError("oversized", f"an update of {len(data)} bytes, at most {max_bytes}")
    if data[: len(UPDATE_MAGIC)] != UPDATE_MAGIC:
        raise WireError("bad_magic", f"an update does not start with {UPDATE_MAGIC!r}")
    try:
        rows = msgpack.unpackb(data[len(UPDATE_MAGIC) :], raw=False, use_list=False,
                               strict_map_key=True, max_array_len=max(max_steps, 5))
    except _MSGPACK_ERRORS as exc:
        raise WireError("malformed", f"undecodable msgpack: {type(exc).__name__}") from exc
    if type(rows) is not tuple or not all(type(r) is tuple and len(r) == 5 for r in rows):
        raise WireError("malformed", "an update is a list of 5-field steps")
    steps = tuple(EstimateStep(*row) for row in rows)
    if steps:  # () is "up to date"
        check_chain(steps, max_steps=max_steps)
    return steps


def _update_for(held: tuple[int, bytes] | None, target: tuple[int, bytes],
                history: Sequence[EstimateStep],
                keyframe: EstimateStep) -> tuple[tuple[EstimateStep, ...], bool]:
    """The steps for a holder of `held`, and whether they are a chain (see `update_for`)."""
    if held == target:
        return (), False
    chain: list[EstimateStep] = []
    for step in history:
        if chain or step.base == held:
            chain.append(step)
    if chain and sum(len(s.payload) for s in chain) < len(keyframe.payload):
        return tuple(chain), True
    return (keyframe,), False


@dataclass(frozen=True)
class EstimateSnapshot:
    """A `PublicEstimate` frozen at one version: what a server hands out while the next step
    is computed in a worker thread (the live estimate is not safe to read then)."""

    version: int
    digest: bytes
    history: tuple[EstimateStep, ...]
    keyframe: EstimateStep

    def update_for(self, held: tuple[int, bytes] | None) -> tuple[EstimateStep, ...]:
        """As `PublicEstimate.update_for`, at this snapshot's version."""
        return _update_for(held, (self.version, self.digest), self.history, self.keyframe)[0]


def copy_state(state: State) -> State:
    return {name: t.clone() for name, t in state.items()}


def _trusted_state(state: Mapping[str, torch.Tensor]) -> State:
    return {name: t.detach().to("cpu", torch.float32).contiguous().clone()
            for name, t in sorted(state.items())}


@dataclass(frozen=True)
class EstimateStatistics:
    """Counters of a `PublicEstimate`: steps taken, and how fetches were answered."""

    version: int
    steps: int
    history_steps: int
    history_bytes: int
    served_chains: int
    served_keyframes: int


class PublicEstimate:
    """The sender's side: x̂, its version and digest, and the last steps that led to it.

    Args:
        initial: x̂ at `version` (e.g. the swarm's seeded LoRA init, or zeros); copied.
        codec: the wire codec of every step.
        version: the version of `initial`.
        keep: the most steps kept for answering deltas.
        max_history_bytes: the most payload bytes kept; the oldest steps go first.

    Memory: x̂, at most `max_history_bytes` of steps, and one cached keyframe of x̂ now.
    """

    def __init__(self, initial: Mapping[str, torch.Tensor], codec: Codec, *, version: int = 0,
                 keep: int = 8, max_history_bytes: int = 64 << 20) -> None:
        if keep < 0 or max_history_bytes < 0:
            raise ValueError("keep and max_history_bytes are >= 0")
        if type(version) is not int or not 0 <= version < MAX_VERSION:
            raise ValueError(f"an estimate version is an int in 0..{MAX_VERSION - 1}")
        self.codec = codec
        self._state = _trusted_state(initial)
        self._shapes = shapes_of(self._state)
        self._version = version
        self._digest = estimate_digest(self._state)
        self._keep = keep
        self._max_history_bytes = max_history_bytes
        self._history: deque[EstimateStep] = deque()
        self._keyframe: EstimateStep | None = None
        self._counts = {"steps": 0, "chains": 0, "keyframes": 0}

    @property
    def version(self) -> int:
        """The version of x̂ now."""
        return self._version

    @property
    def digest(self) -> bytes:
        """`estimate_digest` of x̂ now."""
        return self._digest

    @property
    def estimate(self) -> State:
        """A copy of x̂ now (changing it in place must not break the digest it is named by)."""
        return copy_state(self._state)

    def step(self, x: Mapping[str, torch.Tensor], *, version: int | None = None,
             codec: Codec | None = None) -> EstimateStep:
        """Move x̂ towards `x` by one compressed step (of `codec`, else the estimate's) and
        return that step.

        1. q = codec.encode(x - x̂); 2. x̂ <- x̂ + decode(q), decoding our own bytes exactly as a
        receiver will; 3. bump the version (to `version` if given), re-digest, remember the step.
        """
        if shapes_of(x) != self._shapes:
            raise ValueError("x has other tensors or shapes than the estimate")
        new_version = self._version + 1 if version is None else version
        if not self._version < new_version <= MAX_VERSION:
            raise ValueError(f"version {new_version} does not follow {self._version}")
        residual = {name: x[name].detach().to("cpu", torch.float32) - self._state[name]
                    for name in self._state}
        codec = codec or self.codec
        payload = codec.encode(residual)
        moved = codec.decode(payload, shapes=self._shapes, max_bytes=len(payload))
        # From here on x̂ moves by exactly what a receiver decodes: the residual x - x̂ left
        # over is the error that the next step feeds back.
        state = {name: self._state[name] + moved[name] for name in self._state}
        step = EstimateStep(self._version, self._digest, new_version, estimate_digest(state),
                            payload)
        self._state, (self._version, self._digest) = state, step.target
        self._keyframe = None
        self._remember(step)
        self._counts["steps"] += 1
        return step

    def keyframe(self) -> EstimateStep:
        """x̂ now as a keyframe: float32, exact, zstd-wrapped when the step codec is."""
        if self._keyframe is None:
            payload = Codec("fp32", zstd=self.codec.zstd).encode(self._state)
            self._keyframe = EstimateStep(-1, NO_DIGEST, self._version, self._digest, payload)
        return self._keyframe

    def update_for(self, held: tuple[int, bytes] | None) -> tuple[EstimateStep, ...]:
        """What to send a neighbour that holds `held` = (version, digest) of our x̂, or nothing.

        Returns () when it is up to date, the chain of steps since its version when we still
        have it and it is smaller than a keyframe, and (keyframe,) otherwise.
        """
        if held == (self._version, self._digest):
            return ()  # before `keyframe()`, which encodes the whole estimate
        steps, is_chain = _update_for(held, (self._version, self._digest), self._history,
                                      self.keyframe())
        if steps:
            self._counts["chains" if is_chain else "keyframes"] += 1
        return steps

    def snapshot(self) -> EstimateSnapshot:
        """This version, frozen (its keyframe encoded now, so call it off the event loop)."""
        return EstimateSnapshot(self._version, self._digest, tuple(self._history),
                                self.keyframe())

    def statistics(self) -> EstimateStatistics:
        """Counters and the history's size now."""
        return EstimateStatistics(
            self._version, self._counts["steps"], len(self._history),
            sum(len(s.payload) for s in self._history), self._counts["chains"],
            self._counts["keyframes"])

    def _remember(self, step: EstimateStep) -> None:
        self._history.append(step)
        total = sum(len(s.payload) for s in self._history)
        while self._history and (len(self._history) > self._keep
                                 or total > self._max_history_bytes):
            total -= len(self._history.popleft().payload)

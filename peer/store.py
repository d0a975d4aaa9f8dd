"""A peer's data folder: checkpoints, metrics, status and the exported PEFT adapter.

Layout of DIR:
    node.key              persistent libp2p identity (written by libp2p's keystore, mode 0600)
    checkpoint.safetensors  latest adapter + {version, samples, round} in its metadata
    metrics.jsonl         one JSON line per round
    status.json           what the peer is doing now (rewritten every round)
    export/               standard PEFT adapter folder: PeftModel.from_pretrained(base, DIR/export);
                          a symlink to the newest `.export-<n>/`, swapped atomically
    seqno                 the highest gossipsub sequence number reserved (gossip/seqno.py)
    privacy.json          the ε ledger of the peer's own steps (peer/privacy.py); written
                          after each training round, before its adapter is served

Every file that a crash could leave half-written is written to a temporary name, fsynced and
renamed over the old one, so a reader (or a restart) sees either the old or the new file.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from peer.errors import PeerError
from peer.privacy import parse_history

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.safetensors"
LEDGER = "privacy.json"
_EXPORT_PREFIX = ".export-"  # versioned export folders; `export` links to the newest


@dataclass(frozen=True)
class Checkpoint:
    """What a restart resumes from."""

    state: dict[str, torch.Tensor]
    version: int
    samples: int
    round: int
    swarm: str
    # Running totals the daemon reports (merges, bytes, seconds), so that a restart continues
    # them; a checkpoint written before they were kept loads with none.
    counters: Mapping[str, float] = field(default_factory=dict)


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers never see a partial file.

    Raises:
        PeerError: the file cannot be written (disk full, read-only folder); the old file is
            left as it was and no temporary file is left behind.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _write_error(path, exc) from exc
    _fsync_dir(path.parent)


def _write_error(path: Path, exc: OSError) -> PeerError:
    """One line that says what failed and what to do; the previous `path` is still there."""
    return PeerError(f"cannot write {path}: {exc.strerror or exc}; {_fix(path, exc)}; "
                     f"the previous {path.name} is intact")


def _fix(path: Path, exc: OSError) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free disk space"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"make {path.parent} writable"
    return "check the disk"


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (a crash right after could otherwise undo it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise PeerError(f"cannot sync {folder}: {exc.strerror or exc}; check the disk") from exc


class PeerStore:
    """Reads and writes the files of one peer's data folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.metrics_path = root / "metrics.jsonl"
        self.status_path = root / "status.json"
        self.export_dir = root / "export"

    def save_checkpoint(self, ckpt: Checkpoint) -> None:
        """Replace the checkpoint atomically.

        Raises:
            PeerError: it cannot be written (disk full); the previous checkpoint is intact.
        """
        meta = {"version": str(ckpt.version), "samples": str(ckpt.samples),
                "round": str(ckpt.round), "swarm": ckpt.swarm,
                "counters": json.dumps(dict(ckpt.counters), sort_keys=True)}
        atomic_write(self.root / CHECKPOINT, save_safetensors(dict(ckpt.state), metadata=meta))

    def load_checkpoint(self, swarm: str) -> Checkpoint | None:
        """The last checkpoint, or None when there is none.

        A checkpoint that is cut short, holds NaN/Inf or negative counts is refused rather
        than resumed from: it would poison every neighbour at the first merge. The file is
        left as it is, for the user to inspect or move away.

        Raises:
            PeerError: the checkpoint is unreadable, damaged or belongs to another swarm.
        """
        path = self.root / CHECKPOINT
        if not path.is_file():
            return None
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise PeerError(f"cannot read {path}: {exc.strerror}; check its permissions") from exc
        try:
            ckpt = _parse_checkpoint(raw)
        except ValueError as exc:
            raise PeerError(f"{path}: {exc}; move it away to start over") from exc
        if ckpt.swarm != swarm:
            raise PeerError(
                f"{path}: belongs to swarm {ckpt.swarm[:12]}, not {swarm[:12]} (another model, "
                "LoRA shape or seed); use another --data-dir or move the checkpoint away"
            )
        return ckpt

    def save_ledger(self, ledger: Mapping[str, Any]) -> None:
        """Replace the privacy ledger atomically (before the adapter it describes is served).

        Raises:
            PeerError: it cannot be written (disk full); the previous ledger is intact.
        """
        atomic_write(self.root / LEDGER, (json.dumps(ledger, sort_keys=True) + "\n").encode())

    def load_ledger(self, resumed: Checkpoint | None) -> list[tuple[float, float, int]]:
        """The ledger's segments (σ, q, steps); a restart continues them, never resets them.

        A checkpoint that embodies samples but has no ledger beside it was trained before
        ledgers were kept: its steps are counted as one step without noise (no guarantee).

        Raises:
            PeerError: the ledger is unreadable or damaged (never silently reset).
        """
        path = self.root / LEDGER
        if not path.is_file():
            return [(0.0, 1.0, 1)] if resumed is not None and resumed.samples else []
        try:
            return parse_history(json.loads(path.read_text()))
        except OSError as exc:
            raise PeerError(f"cannot read {path}: {exc.strerror}; check its permissions") from exc
        except (ValueError, UnicodeDecodeError) as exc:
            raise PeerError(f"{path}: damaged privacy ledger ({exc}); restore it, or start "
                            "over in a new --data-dir (the ε it counted is spent)") from exc

    def append_metrics(self, record: Mapping[str, Any]) -> None:
        """Append one JSON line.

        Raises:
            PeerError: the line cannot be written (disk full).
        """
        try:
            with open(self.metrics_path, "a") as handle:
                handle.write(json.dumps(record, sort_keys=True) + "\n")
        except OSError as exc:
            path = self.metrics_path
            raise PeerError(f"cannot append to {path}: {exc.strerror or exc}; "
                            f"{_fix(path, exc)}") from exc

    def write_status(self, status: Mapping[str, Any]) -> None:
        """Replace status.json atomically.

        Raises:
            PeerError: it cannot be written (disk full); the previous status is intact.
        """
        text = json.dumps(status, indent=2, sort_keys=True) + "\n"
        atomic_write(self.status_path, text.encode())

    def export(self, peft_model: Any, adapter: str = "default") -> Path:
        """Save a standard PEFT adapter folder, replacing the previous export whole.

        `export` is a symlink to a versioned folder `.export-<n>`: the new folder is written
        and fsynced first, then a new link is renamed over the old one, so a reader sees the
        old adapter or the new one, never a missing or half-written folder. (A folder cannot
        be renamed over a non-empty one, so swapping folders left a moment without any.)

        Args:
            adapter: which of the model's adapters to export (in-process simulations share a
                model between peers); it is saved as the folder's default adapter.

        Raises:
            PeerError: the adapter cannot be written (disk full); the previous export stays.
        """
        folder = self.root / f"{_EXPORT_PREFIX}{self._next_export_number()}"
        try:
            _save_adapter(peft_model, adapter, folder)
            self._point_export_at(folder)
        except (OSError, SafetensorError) as exc:  # safetensors reports a full disk as its own
            shutil.rmtree(folder, ignore_errors=True)
            reason = getattr(exc, "strerror", None) or exc
            raise PeerError(f"cannot write {folder}: {reason}; free disk space; "
                            f"the previous {self.export_dir} is intact") from exc
        self._remove_old_exports(keep=folder.name)
        return self.export_dir

    def _next_export_number(self) -> int:
        numbers = [int(p.name[len(_EXPORT_PREFIX):]) for p in self.root.glob(f"{_EXPORT_PREFIX}*")
                   if p.name[len(_EXPORT_PREFIX):].isdigit()]
        return max(numbers, default=0) + 1

    def _point_export_at(self, folder: Path) -> None:
        """Swap the `export` link to `folder` in one rename."""
        link = self.root / ".export.link"
        link.unlink(missing_ok=True)
        os.symlink(folder.name, link)  # relative, so that the data folder can be moved
        if self.export_dir.is_dir() and not self.export_dir.is_symlink():
            # A folder written by an older version: a link cannot replace a folder, so it
            # moves aside first (the one moment, once, without an export).
            os.replace(self.export_dir, self.root / f"{_EXPORT_PREFIX}legacy")
        os.replace(link, self.export_dir)
        _fsync_dir(self.root)

    def _remove_old_exports(self, keep: str) -> None:
        """Delete every export folder but the current one (and older versions' temporaries)."""
        stale = [p for p in self.root.glob(f"{_EXPORT_PREFIX}*") if p.name != keep]
        for path in (*stale, self.root / ".export.tmp", self.root / ".export.old"):
            shutil.rmtree(path, ignore_errors=True)


def _save_adapter(peft_model: Any, adapter: str, folder: Path) -> None:
    """Save `adapter` as the default adapter of a PEFT folder, its files fsynced."""
    shutil.rmtree(folder, ignore_errors=True)  # a crash may have left a partial one
    peft_model.save_pretrained(folder, safe_serialization=True, selected_adapters=[adapter])
    if adapter != "default":  # peft puts other adapters in a subfolder named after them
        nested = folder / adapter
        for item in nested.iterdir():
            os.replace(item, folder / item.name)
        nested.rmdir()
    for item in folder.iterdir():
        if item.is_file():
            with open(item, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(folder)


def _parse_checkpoint(raw: bytes) -> Checkpoint:
    """Decode and check a checkpoint.

    Raises:
        ValueError: what is wrong with it, in a few words.
    """
    expected = _promised_size(raw)
    if len(raw) < expected:
        raise ValueError(f"truncated checkpoint ({len(raw)} of {expected} bytes; a crash or "
                         "a full disk cut it short)")
    try:
        state = load_safetensors(raw)
        meta = _metadata(raw)
        ckpt = Checkpoint(state=state, version=int(meta["version"]),
                          samples=int(meta["samples"]), round=int(meta["round"]),
                          swarm=meta["swarm"], counters=_counters(meta))
    except (SafetensorError, KeyError, ValueError, TypeError) as exc:
        raise ValueError(f"unreadable checkpoint ({exc})") from exc
    for name, count in (("version", ckpt.version), ("samples", ckpt.samples),
                        ("round", ckpt.round)):
        if count < 0:
            raise ValueError(f"damaged checkpoint: negative {name} ({count}) in its metadata")
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"damaged checkpoint: NaN or Inf in tensor {key}")
    return ckpt


def _promised_size(raw: bytes) -> int:
    """The byte count a safetensors blob's own header promises (at least its header's)."""
    if len(raw) < 8:
        return 8
    length = int.from_bytes(raw[:8], "little")
    try:
        header = json.loads(raw[8 : 8 + length])
        ends = [int(entry["data_offsets"][1]) for name, entry in header.items()
                if name != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return 8 + length  # an unreadable header: the parser says what is wrong with it
    return 8 + length + max(ends, default=0)


def _metadata(raw: bytes) -> dict[str, str]:
    """The `__metadata__` map of a safetensors blob (safetensors.torch.load drops it)."""
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + length])
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict):
        raise ValueError("metadata is not a map")
    return {str(k): str(v) for k, v in meta.items()}


def _counters(meta: Mapping[str, str]) -> dict[str, float]:
    counters = json.loads(meta.get("counters", "{}"))
    if not isinstance(counters, dict):
        raise ValueError("counters are not a JSON object")
    totals = {str(name): float(value) for name, value in counters.items()}
    if any(not math.isfinite(value) or value < 0 for value in totals.values()):
        raise ValueError("counters must be finite and non-negative")
    return totals

"""A peer's data folder: checkpoints, metrics, status and the exported PEFT adapter.

Layout of DIR:
    node.key              persistent libp2p identity (written by libp2p's keystore, mode 0600)
    checkpoint.safetensors  latest adapter + {version, samples, round} in its metadata
    metrics.jsonl         one JSON line per round
    status.json           what the peer is doing now (rewritten every round)
    export/               standard PEFT adapter folder: PeftModel.from_pretrained(base, DIR/export)

Every file that a crash could leave half-written is written to a temporary name, fsynced and
renamed over the old one, so a reader (or a restart) sees either the old or the new file.
"""

from __future__ import annotations

import json
import logging
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

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.safetensors"


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
    """Write `data` to `path` so that readers never see a partial file."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PeerStore:
    """Reads and writes the files of one peer's data folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.metrics_path = root / "metrics.jsonl"
        self.status_path = root / "status.json"
        self.export_dir = root / "export"

    def save_checkpoint(self, ckpt: Checkpoint) -> None:
        meta = {"version": str(ckpt.version), "samples": str(ckpt.samples),
                "round": str(ckpt.round), "swarm": ckpt.swarm,
                "counters": json.dumps(dict(ckpt.counters), sort_keys=True)}
        atomic_write(self.root / CHECKPOINT, save_safetensors(dict(ckpt.state), metadata=meta))

    def load_checkpoint(self, swarm: str) -> Checkpoint | None:
        """The last checkpoint, or None when there is none.

        Raises:
            PeerError: the checkpoint is unreadable or belongs to another swarm.
        """
        path = self.root / CHECKPOINT
        if not path.is_file():
            return None
        raw = path.read_bytes()
        try:
            state = load_safetensors(raw)
            meta = _metadata(raw)
            ckpt = Checkpoint(state=state, version=int(meta["version"]),
                              samples=int(meta["samples"]), round=int(meta["round"]),
                              swarm=meta["swarm"], counters=_counters(meta))
        except (SafetensorError, KeyError, ValueError, TypeError) as exc:
            raise PeerError(
                f"{path}: unreadable checkpoint ({exc}); move it away to start over"
            ) from exc
        if ckpt.swarm != swarm:
            raise PeerError(
                f"{path}: belongs to swarm {ckpt.swarm[:12]}, not {swarm[:12]} (another model, "
                "LoRA shape or seed); use another --data-dir or move the checkpoint away"
            )
        return ckpt

    def append_metrics(self, record: Mapping[str, Any]) -> None:
        with open(self.metrics_path, "a") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")

    def write_status(self, status: Mapping[str, Any]) -> None:
        text = json.dumps(status, indent=2, sort_keys=True) + "\n"
        atomic_write(self.status_path, text.encode())

    def export(self, peft_model: Any, adapter: str = "default") -> Path:
        """Save a standard PEFT adapter folder, replacing the previous export whole.

        Args:
            adapter: which of the model's adapters to export (in-process simulations share a
                model between peers); it is saved as the folder's default adapter.
        """
        tmp = self.root / ".export.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        peft_model.save_pretrained(tmp, safe_serialization=True, selected_adapters=[adapter])
        if adapter != "default":  # peft puts other adapters in a subfolder named after them
            nested = tmp / adapter
            for item in nested.iterdir():
                os.replace(item, tmp / item.name)
            nested.rmdir()
        old = self.root / ".export.old"
        shutil.rmtree(old, ignore_errors=True)
        if self.export_dir.exists():
            os.replace(self.export_dir, old)
        os.replace(tmp, self.export_dir)
        shutil.rmtree(old, ignore_errors=True)
        return self.export_dir


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
    return {str(name): float(value) for name, value in counters.items()}

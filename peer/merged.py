"""`loraswarm export`: a peer's newest adapter as a PEFT folder, or merged into its base model.

The LoRA settings come from the folder's export/ (a standard PEFT folder, written when the peer
stops); the values from checkpoint.safetensors, which a running peer rewrites every round, so a
running peer's export is as new as its last round. The base is the model folder the peer used
(status.json "model"), loaded on the CPU in float32 (a peer that trained on a 4-bit base gets
the full-precision base here: merging into 4-bit weights would round the adapter away).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from peer.errors import PeerError
from peer.model import load_base, resolve_model
from peer.store import PeerStore
from peer.summary import read_status

logger = logging.getLogger(__name__)


def export_adapter(folder: Path, out: Path, *, merged: bool, model: str | None = None) -> Path:
    """Write the peer's adapter to `out`: a PEFT adapter folder, or (`merged`) the base model
    with the adapter merged into its weights, with the base's tokenizer.

    Args:
        folder: the peer's data folder.
        out: where to write; must not exist, or be an empty folder.
        merged: merge the adapter into the base (peft `merge_and_unload`).
        model: the base model folder; by default the one status.json names.

    Raises:
        PeerError: one line: the folder, its export or checkpoint, or the base model is missing
            or does not fit the others; `out` is in the way.
    """
    status = read_status(folder)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PeerError(f"{out} exists and is not an empty folder; choose another OUT")
    base_dir = _base_dir(status, model)
    peft_model, tokenizer = _latest_adapter(folder, status, base_dir)
    try:
        if merged:
            result = peft_model.merge_and_unload()
            result.save_pretrained(out, safe_serialization=True)
            tokenizer.save_pretrained(out)
        else:
            peft_model.save_pretrained(out, safe_serialization=True)
    except OSError as exc:
        shutil.rmtree(out, ignore_errors=True)
        raise PeerError(f"cannot write {out}: {exc.strerror or exc}") from exc
    return out


def _base_dir(status: dict[str, Any], model: str | None) -> Path:
    spec = model if model is not None else status.get("model")
    if not isinstance(spec, str) or not spec:
        raise PeerError("status.json names no base model; pass --model PATH")
    if model is None and not Path(spec).is_dir():
        raise PeerError(f"the peer's base model folder {spec} is gone; pass --model PATH")
    return resolve_model(spec)


def _latest_adapter(folder: Path, status: dict[str, Any], base_dir: Path) -> tuple[Any, Any]:
    """The base wrapped with the folder's adapter (settings of export/, values of the
    checkpoint), and the base's tokenizer."""
    from peft import PeftModel

    export = folder / "export"
    if not (export / "adapter_config.json").is_file():
        raise PeerError(f"{folder}: no export/ yet (a peer writes it when it stops: Ctrl-C, "
                        "SIGTERM or --rounds); stop the peer once, then export")
    base, tokenizer = load_base(base_dir)
    try:
        peft_model = PeftModel.from_pretrained(base, export)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise PeerError(f"{export} does not fit the base model {base_dir} "
                        f"({str(exc).splitlines()[0][:200]}); pass the right --model") from exc
    swarm = status.get("swarm_id")
    checkpoint = PeerStore(folder).load_checkpoint(swarm) if isinstance(swarm, str) else None
    if checkpoint is not None:
        _load_values(peft_model, checkpoint.state, folder)
        logger.info("adapter values from %s (round %d)", folder / "checkpoint.safetensors",
                    checkpoint.round)
    return peft_model, tokenizer


def _load_values(peft_model: Any, state: dict[str, torch.Tensor], folder: Path) -> None:
    """Copy the checkpoint's tensors (peft names without the adapter's) into the adapter.

    A frozen-A checkpoint holds only the B factors; its A factors are the export's (seeded).
    """
    params = {name.replace(".default.", "."): param
              for name, param in peft_model.named_parameters() if ".default." in name}
    for name, tensor in state.items():
        param = params.get(name)
        if param is None or param.shape != tensor.shape:
            raise PeerError(f"{folder}: the checkpoint's {name} does not fit its export/ "
                            "(another LoRA shape); move one of them away")
        with torch.no_grad():
            param.copy_(tensor.to(param.dtype))

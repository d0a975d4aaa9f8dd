"""The data folder: atomic checkpoints, metrics, status, and a standard PEFT export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from peer.errors import PeerError
from peer.store import CHECKPOINT, Checkpoint, PeerStore, atomic_write


def _state() -> dict[str, torch.Tensor]:
    return {"a.lora_A.weight": torch.randn(4, 8), "a.lora_B.weight": torch.zeros(8, 4)}


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    store = PeerStore(tmp_path)
    state = _state()
    store.save_checkpoint(Checkpoint(state=state, version=7, samples=56, round=7, swarm="ab12"))
    loaded = store.load_checkpoint("ab12")
    assert loaded is not None
    assert (loaded.version, loaded.samples, loaded.round) == (7, 56, 7)
    for key, value in state.items():
        assert torch.equal(loaded.state[key], value)
    assert not list(tmp_path.glob(".*.tmp")), "temporary files must be renamed away"
    assert loaded.counters == {}


def test_checkpoint_keeps_running_totals(tmp_path: Path) -> None:
    store = PeerStore(tmp_path)
    totals = {"merges": 12, "bytes_in": 1_234_567, "t": 42.5}
    store.save_checkpoint(Checkpoint(state=_state(), version=3, samples=24, round=3,
                                     swarm="ab12", counters=totals))
    loaded = store.load_checkpoint("ab12")
    assert loaded is not None and loaded.counters == totals


def test_no_checkpoint_is_none(tmp_path: Path) -> None:
    assert PeerStore(tmp_path).load_checkpoint("ab12") is None


def test_checkpoint_of_another_swarm_is_refused(tmp_path: Path) -> None:
    store = PeerStore(tmp_path)
    store.save_checkpoint(Checkpoint(state=_state(), version=1, samples=8, round=1, swarm="aaaa"))
    with pytest.raises(PeerError, match="belongs to swarm"):
        store.load_checkpoint("bbbb")


def test_corrupt_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / CHECKPOINT).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(PeerError, match="unreadable checkpoint"):
        PeerStore(tmp_path).load_checkpoint("ab12")


def test_atomic_write_replaces_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "status.json"
    atomic_write(target, b"old")
    atomic_write(target, b"new contents")
    assert target.read_bytes() == b"new contents"
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]


def test_metrics_and_status(tmp_path: Path) -> None:
    store = PeerStore(tmp_path)
    store.append_metrics({"round": 1, "eval_loss": 2.5})
    store.append_metrics({"round": 2, "eval_loss": 2.25})
    rows = [json.loads(line) for line in store.metrics_path.read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    store.write_status({"peer_id": "x", "version": 3})
    assert json.loads(store.status_path.read_text())["version"] == 3


def test_export_loads_with_peft(tmp_path: Path, tiny_lora_model) -> None:
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    with torch.no_grad():
        for name, param in tiny_lora_model.named_parameters():
            if "lora_B" in name:
                param.fill_(0.05)
    store = PeerStore(tmp_path)
    store.export(tiny_lora_model)
    store.export(tiny_lora_model)  # a second export replaces the first whole
    assert (tmp_path / "export" / "adapter_config.json").is_file()
    base = LlamaForCausalLM(tiny_lora_model.base_model.model.config)
    base.load_state_dict(tiny_lora_model.get_base_model().state_dict(), strict=False)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        plain = base(input_ids=ids).logits
        loaded = PeftModel.from_pretrained(base, tmp_path / "export")
        adapted = loaded(input_ids=ids).logits
    assert not torch.allclose(plain, adapted), "the exported adapter must change the output"

"""The data folder: atomic checkpoints, metrics, status, and a standard PEFT export."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save

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
    (tmp_path / CHECKPOINT).write_bytes(b"\x09\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(PeerError, match="unreadable checkpoint"):
        PeerStore(tmp_path).load_checkpoint("ab12")


def _refused(path: Path, match: str) -> str:
    """Load must fail with one line naming the file and the fix, and leave the file as it was."""
    before = (path / CHECKPOINT).read_bytes()
    with pytest.raises(PeerError, match=match) as caught:
        PeerStore(path).load_checkpoint("ab12")
    message = str(caught.value)
    assert str(path / CHECKPOINT) in message and "move it away" in message
    assert "\n" not in message
    assert (path / CHECKPOINT).read_bytes() == before, "a refused checkpoint is kept as it was"
    return message


def test_truncated_checkpoint_is_refused_and_kept(tmp_path: Path) -> None:
    store = PeerStore(tmp_path)
    store.save_checkpoint(Checkpoint(state=_state(), version=2, samples=16, round=2, swarm="ab12"))
    whole = (tmp_path / CHECKPOINT).read_bytes()
    for cut in (len(whole) - 1, len(whole) // 2, 20, 4):
        (tmp_path / CHECKPOINT).write_bytes(whole[:cut])
        assert f"{cut} of " in _refused(tmp_path, "truncated checkpoint")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_checkpoint_with_non_finite_values_is_refused(tmp_path: Path, bad: float) -> None:
    state = _state()
    state["a.lora_B.weight"][3, 1] = bad
    PeerStore(tmp_path).save_checkpoint(
        Checkpoint(state=state, version=2, samples=16, round=2, swarm="ab12"))
    assert "a.lora_B.weight" in _refused(tmp_path, "NaN or Inf")


@pytest.mark.parametrize("name", ["version", "samples", "round"])
def test_checkpoint_with_negative_counts_is_refused(tmp_path: Path, name: str) -> None:
    meta = {"version": "2", "samples": "16", "round": "2", "swarm": "ab12", name: "-1"}
    (tmp_path / CHECKPOINT).write_bytes(save(_state(), metadata=meta))
    _refused(tmp_path, f"negative {name}")


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


def _disk_full(*args: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_disk_full_keeps_the_old_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            failing: str) -> None:
    store = PeerStore(tmp_path)
    store.save_checkpoint(Checkpoint(state=_state(), version=1, samples=8, round=1, swarm="ab12"))
    monkeypatch.setattr(os, failing, _disk_full)
    with pytest.raises(PeerError) as caught:
        store.save_checkpoint(Checkpoint(state=_state(), version=2, samples=16, round=2,
                                         swarm="ab12"))
    monkeypatch.undo()
    message = str(caught.value)
    assert message.startswith(f"cannot write {tmp_path / CHECKPOINT}: No space left on device")
    assert "free disk space" in message and "intact" in message and "\n" not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT], "no temporary file left"
    loaded = store.load_checkpoint("ab12")
    assert loaded is not None and loaded.version == 1


def test_disk_full_on_status_and_metrics_is_a_peer_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = PeerStore(tmp_path)
    store.write_status({"version": 1})
    monkeypatch.setattr(os, "fsync", _disk_full)
    with pytest.raises(PeerError, match="status.json: No space left on device; free disk"):
        store.write_status({"version": 2})
    monkeypatch.setattr("peer.store.open", lambda *a, **k: _disk_full(), raising=False)
    with pytest.raises(PeerError, match="metrics.jsonl: No space left on device"):
        store.append_metrics({"round": 1})
    monkeypatch.undo()
    assert json.loads(store.status_path.read_text()) == {"version": 1}
    assert not list(tmp_path.glob(".*.tmp"))


def _fill_b(model, value: float) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.fill_(value)


def test_export_is_never_missing_during_its_swap(
    tmp_path: Path, tiny_lora_model, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = PeerStore(tmp_path)
    _fill_b(tiny_lora_model, 0.05)
    store.export(tiny_lora_model)
    config = (tmp_path / "export" / "adapter_config.json").read_text()
    seen: list[str] = []

    def check(step: str) -> None:
        # A reader arriving at this moment must find a whole export.
        assert (tmp_path / "export" / "adapter_config.json").read_text() == config, step
        load_file(tmp_path / "export" / "adapter_model.safetensors")
        seen.append(step)

    def watched(real):
        def call(*args, **kwargs):
            check(f"before {real.__name__}{args}")
            result = real(*args, **kwargs)
            check(f"after {real.__name__}{args}")
            return result
        return call

    monkeypatch.setattr(os, "replace", watched(os.replace))
    monkeypatch.setattr(os, "symlink", watched(os.symlink))
    monkeypatch.setattr("peer.store.shutil.rmtree", watched(shutil.rmtree))
    _fill_b(tiny_lora_model, 0.1)
    store.export(tiny_lora_model)
    monkeypatch.undo()
    assert any("replace" in step for step in seen), "the swap was observed"
    weights = load_file(tmp_path / "export" / "adapter_model.safetensors")
    assert all(torch.all(v == 0.1) for k, v in weights.items() if "lora_B" in k), "newest one"
    folders = [p.name for p in tmp_path.iterdir() if p.name.startswith(".export")]
    assert folders == [os.readlink(tmp_path / "export")], "older exports are removed"


def test_export_replaces_a_folder_of_an_older_version(tmp_path: Path, tiny_lora_model) -> None:
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "adapter_config.json").write_text("{}")
    PeerStore(tmp_path).export(tiny_lora_model)
    assert (tmp_path / "export").is_symlink()
    assert json.loads((tmp_path / "export" / "adapter_config.json").read_text())["r"] == 4
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".export")] == [".export-1"]


def test_export_on_a_full_disk_keeps_the_previous_one(
    tmp_path: Path, tiny_lora_model, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = PeerStore(tmp_path)
    store.export(tiny_lora_model)
    monkeypatch.setattr(os, "fsync", _disk_full)
    with pytest.raises(PeerError, match="No space left on device; free disk space"):
        store.export(tiny_lora_model)
    monkeypatch.undo()
    assert os.readlink(tmp_path / "export") == ".export-1"
    assert (tmp_path / "export" / "adapter_config.json").is_file()
    assert not (tmp_path / ".export-2").exists()


def test_resuming_a_checkpoint_of_other_shapes_is_a_clear_error(
    tmp_path: Path, small_model_dir: Path
) -> None:
    from peer.config import PeerConfig
    from peer.setup import build_runtime
    from tests.conftest import write_jsonl

    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "a line to train on"}])
    config = PeerConfig(data_dir=tmp_path / "peer", train_path=train, model=str(small_model_dir))
    runtime = build_runtime(config)
    state = runtime.trainer.state()
    first = sorted(state)[0]
    state[first] = torch.zeros(*state[first].shape, 2)
    runtime.store.save_checkpoint(Checkpoint(state=state, version=1, samples=8, round=1,
                                             swarm=runtime.swarm_hex))
    with pytest.raises(PeerError, match=f"does not fit.*other shapes: {first}.*move it away"):
        build_runtime(config)

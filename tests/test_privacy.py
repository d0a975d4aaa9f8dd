"""The ε ledger: Opacus's accounting, calibration, the budget, restarts and one-line errors."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from opacus.accountants import RDPAccountant

from peer.cli import main
from peer.errors import ConfigError, PeerError
from peer.options import build_config
from peer.privacy import Ledger, PrivacyConfig, calibrate, check_data, epsilon_of, plan
from peer.store import Checkpoint, PeerStore

BUDGET = PrivacyConfig(epsilon=2.0, delta=1e-5, clip=1.0)


def test_epsilon_grows_with_steps() -> None:
    ledger = Ledger(BUDGET, noise=1.0, rate=0.01)
    seen = [ledger.epsilon()]
    for _ in range(4):
        ledger.record(50)
        seen.append(ledger.epsilon())
    assert seen[0] == 0.0 and all(a < b for a, b in zip(seen, seen[1:], strict=False))
    assert ledger.steps == 200 and ledger.history == [(1.0, 0.01, 200)]


@pytest.mark.parametrize(("noise", "expected"), [(1.0, 0.94), (0.8, 1.70)])
def test_epsilon_matches_opacus_for_known_settings(noise: float, expected: float) -> None:
    # DP-NOTES.md: δ = 1e-5, N = 10,000, batch 32, 937 steps (3 epochs).
    accountant = RDPAccountant()
    for _ in range(937):
        accountant.step(noise_multiplier=noise, sample_rate=32 / 10_000)
    ours = epsilon_of([(noise, 32 / 10_000, 937)], 1e-5)
    assert ours == pytest.approx(accountant.get_epsilon(delta=1e-5), rel=1e-9)
    assert ours == pytest.approx(expected, abs=0.01)


def test_segments_compose_like_opacus_steps() -> None:
    accountant = RDPAccountant()
    for noise, rate, steps in ((1.2, 0.02, 30), (0.9, 0.05, 20)):
        for _ in range(steps):
            accountant.step(noise_multiplier=noise, sample_rate=rate)
    ours = epsilon_of([(1.2, 0.02, 30), (0.9, 0.05, 20)], 1e-5)
    assert ours == pytest.approx(accountant.get_epsilon(delta=1e-5), rel=1e-9)


def test_a_step_without_noise_has_no_guarantee() -> None:
    assert epsilon_of([(1.0, 0.1, 5), (0.0, 1.0, 1)], 1e-5) == math.inf
    ledger = Ledger(BUDGET, noise=1.0, rate=0.1, history=[(0.0, 1.0, 1)])
    assert not ledger.affords(1) and ledger.announced() == -1.0
    assert ledger.record_dict()["epsilon"] is None


def test_calibrated_noise_spends_the_budget_in_the_planned_steps() -> None:
    noise = calibrate(BUDGET, rate=0.05, steps=200)
    spent = epsilon_of([(noise, 0.05, 200)], BUDGET.delta)
    assert spent <= BUDGET.epsilon and spent == pytest.approx(BUDGET.epsilon, abs=0.03)


def test_calibration_keeps_opacus_search_warnings_out_of_the_log() -> None:
    # Opacus's σ search says "Optimal order is the largest alpha" for the large σ it tries on
    # the way: three warnings in every DP peer's log at start, about values it then rejected.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        calibrate(PrivacyConfig(epsilon=8.0, delta=1e-5, clip=1.0), rate=8 / 315, steps=80)
    assert [str(w.message) for w in caught] == []


def test_the_ledger_stops_at_the_budget() -> None:
    ledger = plan(BUDGET, examples=400, batch_size=8, steps=40)
    taken = 0
    while ledger.affords(1):
        ledger.record(1)
        taken += 1
    assert 38 <= taken <= 45, "calibrated for 40 steps (to a tolerance)"
    assert ledger.epsilon() <= BUDGET.epsilon
    ledger.record(1)  # what the next step would cost
    assert ledger.epsilon() > BUDGET.epsilon


def test_the_ledger_resumes_from_the_data_folder_and_never_goes_back(tmp_path: Path) -> None:
    store = PeerStore(tmp_path)
    first = plan(BUDGET, examples=400, batch_size=8, steps=40)
    first.record(12)
    store.save_ledger(first.to_json())
    again = plan(BUDGET, examples=400, batch_size=8, steps=40, history=store.load_ledger(None))
    assert again.steps == 12 and again.epsilon() == pytest.approx(first.epsilon())
    # A restart with other settings adds a segment: ε only grows.
    other = plan(PrivacyConfig(epsilon=2.0, noise=3.0), examples=400, batch_size=16, steps=0,
                 history=store.load_ledger(None))
    other.record(1)
    assert other.history[0] == (first.noise, 0.02, 12) and other.history[1] == (3.0, 0.04, 1)
    assert other.epsilon() > first.epsilon()


def test_a_damaged_or_missing_ledger_is_never_a_fresh_budget(tmp_path: Path) -> None:
    store = PeerStore(tmp_path)
    (tmp_path / "privacy.json").write_text(json.dumps({"history": [[1.0, 0.1, -3]]}))
    with pytest.raises(PeerError, match="damaged privacy ledger") as caught:
        store.load_ledger(None)
    assert "\n" not in str(caught.value)
    (tmp_path / "privacy.json").unlink()
    trained = Checkpoint(state={"w": torch.zeros(1)}, version=3, samples=24, round=3,
                         swarm="s")
    assert epsilon_of(store.load_ledger(trained), 1e-5) == math.inf, "trained before ledgers"
    assert store.load_ledger(None) == []


def _values(tmp_path: Path, **privacy: object) -> dict[str, object]:
    return {"data_dir": tmp_path, "train": tmp_path / "t.jsonl", "rounds": 5, **privacy}


@pytest.mark.parametrize(("flags", "message"), [
    ({"dp_epsilon": 0}, "dp_epsilon must be a finite number > 0"),
    ({"dp_epsilon": -1}, "dp_epsilon must be a finite number > 0"),
    ({"dp_epsilon": "inf"}, "dp_epsilon must be a finite number > 0"),
    ({"dp_epsilon": 1, "dp_delta": 1}, "dp_delta must be in"),
    ({"dp_epsilon": 1, "dp_clip": 0}, "dp_clip must be"),
    ({"dp_epsilon": 1, "dp_noise": -2}, "dp_noise must be"),
    ({"dp_noise": 1.0}, "dp_noise needs dp_epsilon"),
    ({"require_dp": 0}, "require_dp must be"),
    ({"dp_epsilon": 8, "grad_checkpointing": True}, "does not work with grad_checkpointing"),
    ({"dp_epsilon": 8, "quantize": "4bit"}, "does not work with grad_checkpointing or quant"),
])
def test_bad_privacy_settings_are_one_line_errors(tmp_path: Path, flags: dict[str, object],
                                                  message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        build_config(_values(tmp_path, **flags))
    assert "\n" not in str(caught.value)


def test_settings_the_data_makes_meaningless_are_one_line_errors() -> None:
    config = PrivacyConfig(epsilon=8.0, delta=1e-4)
    for kwargs, message in (({"examples": 20_000}, "must be below 1/N = 5e-05"),
                            ({"examples": 5000, "pack": True}, "--pack"),
                            ({"examples": 5000, "batch_size": 6000}, "exceeds")):
        arguments = {"batch_size": 8, "pack": False, **kwargs}
        with pytest.raises(ConfigError, match=message) as caught:
            check_data(config, **arguments)  # type: ignore[arg-type]
        assert "\n" not in str(caught.value)
    check_data(config, examples=5000, batch_size=8, pack=False)


def test_a_budget_too_small_for_one_step_is_refused() -> None:
    tiny = PrivacyConfig(epsilon=0.01, delta=1e-5, noise=0.5)
    with pytest.raises(ConfigError, match="too small for even one step"):
        plan(tiny, examples=100, batch_size=50, steps=0)
    with pytest.raises(ConfigError, match="too small|too much"):
        plan(PrivacyConfig(epsilon=1e-4), examples=100, batch_size=50, steps=1000)
    with pytest.raises(ConfigError, match="exceeds the 10 usable"):
        plan(PrivacyConfig(epsilon=1.0, noise=1.0), examples=10, batch_size=16, steps=0)
    with pytest.raises(ConfigError, match="needs --dp-noise"):
        plan(PrivacyConfig(epsilon=1.0), examples=100, batch_size=5, steps=0)


def test_cli_says_a_bad_delta_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          small_model_dir: Path) -> None:
    train = tmp_path / "t.jsonl"
    train.write_text("".join(json.dumps({"text": f"row {i} of the data"}) + "\n"
                             for i in range(50)))
    code = main(["peer", "--data-dir", str(tmp_path / "d"), "--train", str(train),
                 "--model", str(small_model_dir), "--rounds", "2", "--dp-epsilon", "8",
                 "--dp-delta", "0.05"])
    err = capsys.readouterr().err
    assert code == 2 and "must be below 1/N = 0.02" in err
    assert "Traceback" not in err and err.count("\n") == 1

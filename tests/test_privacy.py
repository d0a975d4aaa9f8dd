"""The ε ledger: Opacus's accounting (RDP, and PRV where tighter), calibration, the budget,
restarts and one-line errors."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant

from peer import accounting
from peer.accounting import calibrate, epsilon_of
from peer.cli import main
from peer.errors import ConfigError, PeerError
from peer.options import build_config
from peer.privacy import Ledger, PrivacyConfig, check_data, plan
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
    ours = epsilon_of([(noise, 32 / 10_000, 937)], 1e-5, "rdp")
    assert ours == pytest.approx(accountant.get_epsilon(delta=1e-5), rel=1e-9)
    assert ours == pytest.approx(expected, abs=0.01)


def test_segments_compose_like_opacus_steps() -> None:
    accountant = RDPAccountant()
    for noise, rate, steps in ((1.2, 0.02, 30), (0.9, 0.05, 20)):
        for _ in range(steps):
            accountant.step(noise_multiplier=noise, sample_rate=rate)
    ours = epsilon_of([(1.2, 0.02, 30), (0.9, 0.05, 20)], 1e-5, "rdp")
    assert ours == pytest.approx(accountant.get_epsilon(delta=1e-5), rel=1e-9)


def test_an_epsilon_beyond_what_the_wire_carries_is_announced_as_no_guarantee() -> None:
    ledger = Ledger(PrivacyConfig(epsilon=1e9, noise=0.05), noise=0.05, rate=1.0)
    ledger.record(1000)  # ε 2.2e5 by RDP: on the wire
    assert ledger.announced() == pytest.approx(ledger.epsilon())
    ledger.record(9000)  # ε over 1e6: announcements and headers would refuse it
    assert ledger.epsilon() > 1e6 and ledger.announced() == -1.0


def test_a_step_without_noise_has_no_guarantee() -> None:
    assert epsilon_of([(1.0, 0.1, 5), (0.0, 1.0, 1)], 1e-5) == math.inf
    ledger = Ledger(BUDGET, noise=1.0, rate=0.1, history=[(0.0, 1.0, 1)])
    assert not ledger.affords(1) and ledger.announced() == -1.0
    assert ledger.record_dict()["epsilon"] is None


@pytest.mark.parametrize(("history", "tighter_than"), [
    ([(0.589, 8 / 315, 80)], 0.85),  # the built-in swarm's busiest peer: 6.78 against 8.15
    ([(1.24, 8 / 49, 80)], 0.95),  # its smallest: q = 0.16 amplifies less
    ([(1.2, 0.02, 30), (0.9, 0.05, 20)], 0.95),  # a restart with other settings
])
def test_prv_is_opacus_prv_where_tighter_and_never_above_rdp(
        history: list[tuple[float, float, int]], tighter_than: float) -> None:
    prv = PRVAccountant()
    prv.history = list(history)
    rdp = epsilon_of(history, 1e-5, "rdp")
    ours = epsilon_of(history, 1e-5)
    assert ours == pytest.approx(min(rdp, prv.get_epsilon(delta=1e-5, eps_error=0.01)), rel=1e-9)
    assert ours < tighter_than * rdp


def test_prv_is_not_asked_where_its_grid_would_be_slow(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: object) -> float:
        raise AssertionError("PRV asked beyond its range")

    monkeypatch.setattr(accounting, "_prv_epsilon", refuse)
    accounting._epsilon.cache_clear()
    many = [(1.0, 0.01, accounting.PRV_MAX_STEPS + 1)]  # ε 10 by RDP, but 200,001 steps
    spent = [(0.5, 0.1, 400)]  # ε over 32 by RDP: the budget is long gone
    for history in (many, spent):
        assert epsilon_of(history, 1e-5) == epsilon_of(history, 1e-5, "rdp")
    accounting._epsilon.cache_clear()


def test_where_prv_cannot_answer_rdp_stands(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*_: object, **__: object) -> float:
        raise ValueError("Discrete PLD has no support")  # what a failed FFT grid says, roughly

    monkeypatch.setattr(PRVAccountant, "get_epsilon", fail)
    accounting._epsilon.cache_clear()
    history = [(0.7, 0.03, 57)]
    assert epsilon_of(history, 1e-5) == epsilon_of(history, 1e-5, "rdp")
    accounting._epsilon.cache_clear()


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_calibrated_noise_spends_the_budget_in_the_planned_steps(accountant: str) -> None:
    noise = calibrate(epsilon=2.0, delta=1e-5, rate=0.05, steps=200, accountant=accountant)
    spent = epsilon_of([(noise, 0.05, 200)], 1e-5, accountant)
    assert spent <= 2.0 and spent == pytest.approx(2.0, abs=0.03)


def test_prv_calibration_takes_the_least_noise_that_fits() -> None:
    rate, steps = 8 / 315, 80
    rdp = calibrate(epsilon=8.0, delta=1e-5, rate=rate, steps=steps, accountant="rdp")
    prv = calibrate(epsilon=8.0, delta=1e-5, rate=rate, steps=steps)
    assert prv < 0.95 * rdp, "PRV affords noticeably less noise"
    assert epsilon_of([(prv, rate, steps)], 1e-5) <= 8.0
    assert epsilon_of([(prv * 0.997, rate, steps)], 1e-5) > 8.0, "not more noise than needed"


def test_calibration_keeps_opacus_search_warnings_out_of_the_log() -> None:
    # Opacus's σ search says "Optimal order is the largest alpha" for the large σ it tries on
    # the way: three warnings in every DP peer's log at start, about values it then rejected.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for accountant in ("prv", "rdp"):
            calibrate(epsilon=8.0, delta=1e-5, rate=8 / 315, steps=80, accountant=accountant)
    assert [str(w.message) for w in caught] == []


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_the_ledger_stops_at_the_budget(accountant: str) -> None:
    ledger = plan(PrivacyConfig(epsilon=2.0, accountant=accountant), examples=400,
                  batch_size=8, steps=40)
    start = (f"σ = {ledger.noise:.4g}, sampling rate q = 0.02 (an expected 8 examples a step), "
             "clip C = 1; ε 0 of 2")
    assert start in ledger.describe()
    taken = 0
    while ledger.affords(1):
        ledger.record(1)
        taken += 1
    assert 38 <= taken <= 45, "calibrated for 40 steps (to a tolerance)"
    assert ledger.epsilon() <= BUDGET.epsilon
    assert f"ε {ledger.epsilon():.4g} of 2 spent at δ = 1e-05 ({accountant} accountant); the " \
        "budget holds 0 more steps" in ledger.describe()
    ledger.record(1)  # what the next step would cost
    assert ledger.epsilon() > BUDGET.epsilon


def test_a_shared_sample_rate_gives_peers_of_every_size_one_sigma() -> None:
    shared = PrivacyConfig(epsilon=8.0, sample_rate=0.1, accountant="rdp")
    small, large = (plan(shared, examples=n, batch_size=8, steps=80) for n in (60, 600))
    assert small.rate == large.rate == 0.1 and small.noise == large.noise
    assert "sampling rate q = 0.1 (an expected 60 examples a step)" in large.describe()
    # Without it q = batch / N: the smaller peer samples more of its data and needs more σ.
    alone = PrivacyConfig(epsilon=8.0, accountant="rdp")
    by_batch = [plan(alone, examples=n, batch_size=8, steps=80) for n in (60, 600)]
    assert by_batch[0].noise > by_batch[1].noise
    # The rate, not --batch-size, bounds the sample: a batch above N is no error then.
    check_data(shared, examples=60, batch_size=64, pack=False)
    assert plan(shared, examples=60, batch_size=64, steps=80).rate == 0.1


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
    ({"dp_epsilon": 1, "dp_sample_rate": 0}, "dp_sample_rate must be in"),
    ({"dp_epsilon": 1, "dp_sample_rate": 1.5}, "dp_sample_rate must be in"),
    ({"dp_sample_rate": 0.1}, "dp_sample_rate needs dp_epsilon"),
    ({"require_dp": 0}, "require_dp must be"),
    ({"dp_epsilon": 8, "dp_accountant": "gdp"}, "dp_accountant must be one of prv, rdp"),
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

"""Config from flags and TOML, one-line errors for bad input, and `loraswarm keygen`."""

from __future__ import annotations

from pathlib import Path

import pytest

from gossip.keyfile import read_swarm_key, write_swarm_key
from peer.cli import build_parser, main
from peer.errors import ConfigError
from peer.options import OPTIONS, config_from_args


def _config(argv: list[str]):
    return config_from_args(build_parser().parse_args(["peer", *argv]))


def test_flags_build_every_section(tmp_path: Path) -> None:
    config = _config([
        "--data-dir", str(tmp_path), "--train", "t.jsonl", "--lora-rank", "4",
        "--lora-targets", "q_proj,k_proj", "--lr", "0.01", "--fanout", "3",
        "--merge-rule", "average", "--merge-weights", "equal",
        "--bootstrap", "/ip4/127.0.0.1/tcp/4001/p2p/"
        "12D3KooWGzh5vWxgfEdpHPtvS6BWGKHWmRAZyrcpkUqdrH8kBLkG",
    ])
    assert config.lora.rank == 4 and config.lora.target_modules == ("q_proj", "k_proj")
    assert config.train.lr == 0.01 and config.topology.fanout == 3
    assert config.merge.weights == "equal"
    assert config.network.bootstrap[0].startswith("/ip4/127.0.0.1/tcp/4001")


def test_network_and_settling_flags(tmp_path: Path) -> None:
    config = _config(["--data-dir", str(tmp_path), "--train", "t.jsonl", "--rounds", "5",
                      "--settle-rounds", "3", "--health-check", "0", "--ping-timeout", "20"])
    assert (config.rounds, config.settle_rounds, config.total_rounds) == (5, 3, 8)
    assert config.train.lr_schedule == "constant"
    scheduled = _config(["--data-dir", str(tmp_path), "--train", "t.jsonl", "--rounds", "5",
                         "--lr-schedule", "cosine"])
    assert scheduled.train.lr_schedule == "cosine"
    assert config.network.health_check_s == 0 and config.network.ping_timeout_s == 20
    assert config.network.wire_codec == "sign"  # the default, measured by bench_wire.py
    config = _config(["--data-dir", str(tmp_path), "--train", "t.jsonl",
                      "--wire-codec", "topk:0.05+zstd"])
    assert config.network.wire_codec == "topk:0.05+zstd"


def test_settle_fanout_defaults_to_8_within_the_view_and_at_least_the_fanout(
    tmp_path: Path,
) -> None:
    common = ["--data-dir", str(tmp_path), "--train", "t.jsonl", "--fanout", "3"]
    config = _config(common)
    assert config.topology.settle_fanout == 0 and config.topology.settling_fanout == 8
    assert _config([*common, "--view-size", "5"]).topology.settling_fanout == 5
    assert _config([*common, "--fanout", "12"]).topology.settling_fanout == 12
    assert _config([*common, "--fanout", "0"]).topology.settling_fanout == 0, "trains alone"
    config = _config([*common, "--settle-fanout", "8"])
    assert config.topology.settle_fanout == 8 and config.topology.settling_fanout == 8
    toml = tmp_path / "peer.toml"
    toml.write_text("settle_fanout = 6\n")
    assert _config(["--config", str(toml), *common]).topology.settling_fanout == 6


def test_libp2p_settings_follow_the_network_flags() -> None:
    from gossip.config import NodeConfig, connection_config

    pinged = connection_config(NodeConfig(fetch_timeout_s=64, health_check_s=15))
    assert pinged.enable_health_monitoring and pinged.health_check_interval == 15
    unpinged = connection_config(NodeConfig(fetch_timeout_s=64, health_check_s=0))
    assert not unpinged.enable_health_monitoring
    for settings in (pinged, unpinged):  # a stream may negotiate as long as a fetch may take
        assert settings.outbound_stream_protocol_negotiation_timeout == 64
        assert settings.inbound_stream_protocol_negotiation_timeout == 64
    short = connection_config(NodeConfig(fetch_timeout_s=3))
    assert short.outbound_stream_protocol_negotiation_timeout == 10, "never below libp2p's"


def test_toml_is_read_and_flags_win(tmp_path: Path) -> None:
    toml = tmp_path / "peer.toml"
    toml.write_text(f'data_dir = "{tmp_path}"\ntrain = "a.jsonl"\nlr = 0.005\nrounds = 3\n'
                    'listen = ["/ip4/127.0.0.1/tcp/0"]\nlora_targets = ["q_proj"]\n')
    config = _config(["--config", str(toml), "--rounds", "9"])
    assert config.train.lr == 0.005
    assert config.rounds == 9
    assert config.train_path == Path("a.jsonl")
    assert config.lora.target_modules == ("q_proj",)


def test_help_says_which_settings_a_swarm_shares() -> None:
    from peer.cli import build_parser

    peer = build_parser()._subparsers._group_actions[0].choices["peer"]  # type: ignore[union-attr]
    text = peer.format_help()
    swarm, agree, own = (text.index(title) for title in (
        "swarm settings (every peer", "training settings (should match", "this peer's own"))
    listed = {flag: text.index("\n  " + flag) for flag in (  # below the usage lines
        "--lora-rank", "--model", "--batch-size", "--lr", "--device", "--dtype", "--quantize",
        "--grad-accum", "--grad-checkpointing", "--threads", "--pack")}
    assert swarm < listed["--lora-rank"] < agree and swarm < listed["--model"] < agree
    assert swarm < listed["--quantize"] < agree  # a 4-bit base is a swarm of its own
    assert agree < listed["--batch-size"] < own and agree < listed["--lr"] < own
    assert min(listed[f] for f in ("--device", "--dtype", "--grad-accum",
                                   "--grad-checkpointing", "--threads", "--pack")) > own


def test_every_option_has_help() -> None:
    for option in OPTIONS:
        assert option.help().strip(), option.name


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--lr", "abc"], "--lr"),
        (["--lr", "5"], "lr must be in"),
        (["--lora-rank", "0"], "rank"),
        (["--bootstrap", "/ip4/127.0.0.1/tcp/1"], "/p2p/"),
        (["--bootstrap", "nonsense"], "not a multiaddr"),
        (["--fanout", "-1"], "fanout"),
        (["--settle-fanout", "-1"], "settle_fanout must be in 0..view_size"),
        (["--settle-fanout", "65"], r"settle_fanout must be in 0..view_size \(64\), got 65"),
        (["--settle-fanout", "9", "--view-size", "8"], r"view_size \(8\)"),
        (["--settle-fanout", "two"], "--settle-fanout"),
        (["--merge-rule", "nope"], "nope"),
        (["--merge-weights", "data"], "weights must be one of samples, equal, got 'data'"),
        (["--ping-timeout", "0"], "timeout"),
        (["--health-check", "-1"], "health_check"),
        (["--linger", "-5"], "linger_s"),
        (["--settle-rounds", "2"], "settle_rounds"),  # without --rounds there is nothing to settle
        (["--lr-schedule", "step"], "lr_schedule must be one of constant, linear, cosine"),
        (["--lr-schedule", "cosine"], "needs rounds > 0"),  # nothing to decay over
        (["--wire-codec", "gzip"], "wire_codec"),
        (["--wire-codec", "topk:2+zstd"], "wire_codec"),
        (["--settle-codec", "int4"], "settle_codec"),
        (["--membership-tick", "0"], "tick_s must be a positive number"),
        (["--eval-batch-size", "0"], "eval_batch_size must be at least 1"),
    ],
)
def test_bad_values_are_one_line_errors(tmp_path: Path, argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        _config(["--data-dir", str(tmp_path), "--train", "t.jsonl", *argv])
    assert "\n" not in str(caught.value)


def test_unknown_toml_key(tmp_path: Path) -> None:
    toml = tmp_path / "peer.toml"
    toml.write_text('data_dir = "x"\ntrain = "t"\nlearning_rate = 0.1\n')
    with pytest.raises(ConfigError, match="unknown key 'learning_rate'"):
        _config(["--config", str(toml)])


def test_missing_required_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="missing --train"):
        _config(["--data-dir", str(tmp_path)])


def test_cli_reports_errors_without_traceback(tmp_path: Path, capsys) -> None:
    code = main(["peer", "--data-dir", str(tmp_path), "--train", str(tmp_path / "none.jsonl")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("loraswarm: error:") and "none.jsonl" in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_keygen_writes_a_private_key_file(tmp_path: Path, capsys) -> None:
    path = tmp_path / "swarm.key"
    assert main(["keygen", str(path)]) == 0
    key = read_swarm_key(path)
    assert len(key) == 64 and int(key, 16) >= 0
    assert path.stat().st_mode & 0o777 == 0o600
    assert main(["keygen", str(path)]) == 2, "an existing key is never overwritten"
    assert "exists already" in capsys.readouterr().err


def test_swarm_key_flag_reads_the_file(tmp_path: Path) -> None:
    key = write_swarm_key(tmp_path / "k")
    config = _config(["--data-dir", str(tmp_path), "--train", "t", "--swarm-key",
                      str(tmp_path / "k")])
    assert config.network.psk == key


def test_bad_swarm_key_file(tmp_path: Path) -> None:
    bad = tmp_path / "k"
    bad.write_text("not a key\n")
    bad.chmod(0o600)
    with pytest.raises(ConfigError, match="not a swarm key file"):
        _config(["--data-dir", str(tmp_path), "--train", "t", "--swarm-key", str(bad)])


def test_swarm_key_file_open_to_others_is_refused(tmp_path: Path, capsys) -> None:
    key = tmp_path / "swarm.key"
    write_swarm_key(key)
    key.chmod(0o644)
    code = main(["peer", "--data-dir", str(tmp_path), "--train", "t", "--swarm-key", str(key)])
    err = capsys.readouterr().err
    assert code == 2
    assert f"swarm key {key} is open to group or others (mode 0644)" in err
    assert f"chmod 600 {key}" in err
    assert "Traceback" not in err and err.count("\n") == 1

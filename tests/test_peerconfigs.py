"""The simulator's currency: a `PeerConfig` and the TOML file a peer process reads it from."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from gossip.keyfile import write_swarm_key
from peer.cli import build_parser
from peer.config import PeerConfig
from peer.options import build_config, config_from_args
from scripts.peerconfigs import peer_arg_values, with_bootstrap, write_toml

BOOTSTRAP = "/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWEyoppNCUx8Yx66oV9fJnriXwCcXwDDUA2kj6vnc6iDEp"


def _config(tmp_path: Path) -> PeerConfig:
    """A setting off its default in every section, and values TOML must quote or spell out."""
    key = tmp_path / "swarm.key"
    write_swarm_key(key)
    return build_config({
        "data_dir": tmp_path / 'odd "name" ü', "train": tmp_path / "t.jsonl",
        "eval": tmp_path / "e.jsonl", "model": "builtin-small", "rounds": 3,
        "settle_rounds": 2, "linger": 1e-05, "attack": "noise", "attack_scale": math.inf,
        "lora_rank": 4, "lora_targets": ["q_proj", "v_proj"], "lr": 6e-3, "frozen_a": True,
        "listen": ["/ip4/127.0.0.1/tcp/0", "/ip4/127.0.0.1/tcp/5"], "bootstrap": [BOOTSTRAP],
        "swarm_key": key, "fanout": 3, "peer_timeout": 640, "merge_rule": "median", "trim": 2,
    })


def test_a_config_round_trips_through_the_toml_file_a_peer_reads(tmp_path: Path) -> None:
    config = _config(tmp_path)
    path = write_toml(config, tmp_path / "p1.toml")
    again = config_from_args(build_parser().parse_args(["peer", "--config", str(path)]))
    assert again == config
    assert again.network.psk == config.network.psk is not None
    assert (path.with_suffix(".key").stat().st_mode & 0o777) == 0o600
    rewritten = write_toml(config, path)  # a restart rewrites it, key file and all
    assert config_from_args(build_parser().parse_args(["peer", "--config", str(rewritten)])) \
        == config


def test_a_setting_no_option_carries_is_refused(tmp_path: Path) -> None:
    config = _config(tmp_path)
    odd = dataclasses.replace(config, network=dataclasses.replace(config.network, max_uploads=9))
    with pytest.raises(ValueError, match="no peer option"):
        write_toml(odd, tmp_path / "odd.toml")


def test_peer_args_parse_as_the_peer_cli_does(tmp_path: Path) -> None:
    assert peer_arg_values(["--lr=0.01", "--listen", "/ip4/127.0.0.1/tcp/1"]) == {
        "lr": "0.01", "listen": ["/ip4/127.0.0.1/tcp/1"]}
    toml = tmp_path / "extra.toml"
    toml.write_text('lr = 0.5\nfanout = 1\n')
    assert peer_arg_values([f"--config={toml}", "--lr=0.01"]) == {"lr": "0.01", "fanout": 1}
    with pytest.raises(SystemExit):
        peer_arg_values(["--no-such-flag"])


def test_the_bootstrap_address_goes_first(tmp_path: Path) -> None:
    config = _config(tmp_path)
    joined = with_bootstrap(config, BOOTSTRAP.replace("4001", "4002"))
    assert joined.network.bootstrap == (BOOTSTRAP.replace("4001", "4002"), BOOTSTRAP)
    assert dataclasses.replace(joined, network=config.network) == config

"""scripts/simulate.py --link / --link-profile: peers behind emulated WAN links, both modes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.links import assign_links, read_profile
from scripts.simulate import parse_args
from testbed.wan import Link

ROOT = Path(__file__).resolve().parent.parent
SLOW, FAST = Link(0.02, 5e6), Link(0.05, 20e6)


def _profile(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "links.toml"
    path.write_text(text)
    return path


def test_a_profile_gives_its_share_of_peers_its_link_by_seed(tmp_path: Path) -> None:
    path = _profile(tmp_path, '[[links]]\nshare = 0.25\nlink = "delay=20ms,rate=5mbit"\n')
    profile = read_profile(path)
    assert profile == [(0.25, SLOW)]
    links = assign_links(8, FAST, profile, seed=3)
    assert links.count(SLOW) == 2 and links.count(FAST) == 6
    assert assign_links(8, FAST, profile, seed=3) == links, "the same seed, the same peers"
    others = {tuple(assign_links(8, FAST, profile, seed=s)) for s in range(10)}
    assert len(others) > 1, "another seed draws other peers"
    assert assign_links(4, None, profile, seed=0).count(None) == 3, "no --link: no proxy"


@pytest.mark.parametrize("text, says", [
    ('[[links]]\nshare = 0.6\nlink = "rate=1mbit"\n[[links]]\nshare = 0.6\nlink = "rate=2mbit"\n',
     "more than 1"),
    ('[[links]]\nshare = 0\nlink = "rate=1mbit"\n', "needs share"),
    ('[[links]]\nshare = 0.5\nlink = "rate=1mb"\n', "bad rate"),
    ('[[links]]\nshare = 0.5\n', "needs share"),
    ('share = 0.5\n', "expected [[links]]"),
    ("[[links]\n", "link profile"),
])
def test_bad_profiles_are_refused_before_anything_runs(tmp_path: Path, text: str, says: str,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--link-profile", str(_profile(tmp_path, text))])
    assert says in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--link", "delay=5"],
                                  ["--link", "rate=1mbit", "--in-process", "--workers", "2"]])
def test_bad_link_flags_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(argv)


@pytest.mark.slow
@pytest.mark.parametrize("mode", [[], ["--in-process"]], ids=["processes", "in-process"])
def test_peers_merge_across_links(mode: list[str], tmp_path: Path, small_model_dir: Path) -> None:
    """Two peers, the bootstrap behind a 50 ms / 20 Mbit/s link: the joiner reaches it only
    through its proxy, which carries both adapters (the one connection), and both merge."""
    command = [
        sys.executable, str(ROOT / "scripts" / "simulate.py"), *mode, "--peers", "2",
        "--out", str(tmp_path), "--model", str(small_model_dir), "--rounds", "2",
        "--steps-per-round", "1", "--batch-size", "2", "--seq-len", "32", "--eval-every", "2",
        "--eval-per-category", "1", "--timeout", "300", "--peer-arg=--round-pause=0.5",
        "--link", "delay=50ms,rate=20mbit",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert all(peer["merges"] >= 1 for peer in result["peers"]), result["peers"]
    links = result["links"]
    assert [link["link"] for link in links] == ["delay=50ms,rate=20mbit,jitter=0ms"] * 2
    received = sum(peer["bytes_received"] for peer in result["peers"])
    carried = links[0]["bytes_up"] + links[0]["bytes_down"]
    assert links[0]["connections"] >= 1 and carried >= received > 0, (links, received)

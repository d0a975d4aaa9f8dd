"""Swarm key files: written readable by their owner only, refused when others may read them."""

from __future__ import annotations

from pathlib import Path

import pytest

from gossip.keyfile import read_swarm_key, write_swarm_key


def test_written_key_is_owner_only_and_reads_back(tmp_path: Path) -> None:
    path = tmp_path / "swarm.key"
    key = write_swarm_key(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert read_swarm_key(path) == key


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o602, 0o644, 0o666])
def test_key_open_to_group_or_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "swarm.key"
    write_swarm_key(path)
    path.chmod(mode)
    with pytest.raises(ValueError) as caught:
        read_swarm_key(path)
    message = str(caught.value)
    assert f"{path}" in message and f"mode {mode:04o}" in message
    assert f"chmod 600 {path}" in message and "\n" not in message


@pytest.mark.parametrize("mode", [0o400, 0o600])
def test_owner_only_modes_are_accepted(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "swarm.key"
    key = write_swarm_key(path)
    path.chmod(mode)
    assert read_swarm_key(path) == key


def test_bare_hex_key_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "swarm.key"
    path.write_text("AB" * 32 + "\n")
    path.chmod(0o600)
    assert read_swarm_key(path) == "ab" * 32


def test_missing_key_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read swarm key .*: No such file"):
        read_swarm_key(tmp_path / "none.key")

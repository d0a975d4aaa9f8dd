"""Swarm key files: the pre-shared key of a private swarm, in the libp2p `swarm.key` layout.

    /key/swarm/psk/1.0.0/
    /base16/
    <64 hex characters>

A file holding only the 64 hex characters is accepted too. Like ssh with its private keys, a
key file that its group or others may read or write is refused: whoever can read it can join
the swarm.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from gossip.errors import GossipError

_HEADER = ("/key/swarm/psk/1.0.0/", "/base16/")


def new_swarm_key() -> str:
    """A fresh 256-bit pre-shared key, as 64 hex characters."""
    return secrets.token_hex(32)


def write_swarm_key(path: Path, key: str | None = None) -> str:
    """Write a swarm key file readable only by its owner; refuses to overwrite one.

    Raises:
        GossipError: the file exists already.
    """
    key = key or new_swarm_key()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise GossipError(f"{path}: exists already; pick another path or delete it") from exc
    with os.fdopen(fd, "w") as handle:
        handle.write("\n".join((*_HEADER, key)) + "\n")
    return key


def read_swarm_key(path: Path) -> str:
    """Read a swarm key file and return its 64 hex characters.

    Raises:
        ValueError: the file is missing, open to group or others, or not a swarm key (one
            line, with the fix).
    """
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"cannot read swarm key {path}: {exc.strerror}") from exc
    if mode & 0o077:
        raise ValueError(f"swarm key {path} is open to group or others (mode {mode:04o}); "
                         f"run `chmod 600 {path}`")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if lines[:2] == list(_HEADER):
        lines = lines[2:]
    key = lines[0].lower() if len(lines) == 1 else ""
    if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
        raise ValueError(f"{path} is not a swarm key file; make one with `loraswarm keygen FILE`")
    return key

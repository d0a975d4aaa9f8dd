"""Exceptions of the peer daemon.

Every message is one line that names the offending input and, where there is one, the fix: the
CLI prints `str(exc)` of a `PeerError` and exits, without a traceback.
"""

from __future__ import annotations


class PeerError(Exception):
    """Base of every problem the peer reports to its user as one line."""


class ConfigError(PeerError):
    """A setting or argument is out of range or inconsistent with another."""


class DataError(PeerError):
    """Training or eval data is missing, empty or malformed (the message names file and line)."""


class ModelError(PeerError):
    """The base model cannot be found, downloaded, converted or loaded."""

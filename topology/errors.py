"""Exceptions of the `topology` package.

Both concrete errors are also `ValueError`s: the CLI turns any `ValueError` raised while building
the configuration into a one-line message, and callers that pass a bad argument get the exception
type they would expect from any other pure function.
"""

from __future__ import annotations


class TopologyError(Exception):
    """Base of every error raised by the `topology` package."""


class TopologyConfigError(TopologyError, ValueError):
    """A `TopologyConfig` field is out of range or inconsistent with another field."""


class InvalidArgument(TopologyError, ValueError):
    """A caller passed a value outside a function's contract (a bug in the caller, not input)."""

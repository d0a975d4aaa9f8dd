"""The layers import downwards only: scripts → testbed → peer → gossip → topology, merge.

topology/ and merge/ are pure (neither the network nor the daemon); the daemon's packages
import neither scripts/ nor testbed/ (the simulator's corpora and the loopback harness).
Every import statement counts, including those inside functions.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIRST_PARTY = {"scripts", "testbed", "peer", "gossip", "topology", "merge", "tests"}
ALLOWED = {
    "scripts": {"scripts", "testbed", "peer", "gossip", "topology", "merge"},
    "testbed": {"testbed", "peer", "gossip", "topology", "merge"},
    "peer": {"peer", "gossip", "topology", "merge"},
    "gossip": {"gossip", "topology"},
    "topology": {"topology"},
    "merge": {"merge"},
}
# What the command line must not import before it has a peer to run: 2-4 s before `--help`.
HEAVY = ("torch", "transformers", "peft", "libp2p", "opacus", "safetensors")


def imported_packages(path: Path) -> set[str]:
    """The first-party top-level packages a module imports, anywhere in it."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found.update(name.split(".")[0] for name in names)
    return found & FIRST_PARTY


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_point_down_the_layers(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package}/ has no modules"
    wrong = {
        str(path.relative_to(ROOT)): sorted(imported_packages(path) - ALLOWED[package])
        for path in files
    }
    assert {name: up for name, up in wrong.items() if up} == {}


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    module = tmp_path / "upward.py"
    module.write_text("def late():\n    from peer.daemon import Peer\n    import scripts.x\n")
    assert imported_packages(module) == {"peer", "scripts"}


def test_the_command_line_loads_without_torch_or_libp2p() -> None:
    # A fresh interpreter: this test process has imported everything already.
    code = f"import sys, peer.cli; print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, check=True)
    assert done.stdout.split() == []

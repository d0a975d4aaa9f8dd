"""scripts/bench_codecs.py on the Qwen2-0.5B adapter shape, one round of two codecs."""

from __future__ import annotations

import json
from pathlib import Path

from scripts.bench_codecs import main


def test_bench_codecs_writes_bytes_and_errors(tmp_path: Path) -> None:
    out = tmp_path / "codecs.json"
    assert main(["--json", str(out), "--rounds", "1", "--codecs", "fp32", "int8+zstd"]) == 0
    result = json.loads(out.read_text())
    assert result["shape"]["params"] == 24 * (2 * 16 * 896 * 2 + 16 * 896 * 2 + 16 * 128 * 2)
    fp32, int8 = result["codecs"]["fp32"], result["codecs"]["int8+zstd"]
    assert fp32["rel_error"] == 0 and fp32["lag"] == 0
    assert 3 < int8["ratio_vs_fp32"] < 4.5 and int8["rel_error"] < 0.01

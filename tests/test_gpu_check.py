"""``bench/gpu_check.py --dry-run``: the GPU check's plumbing (every phase, the JSON and the table) on CPU under the
Triton interpreter, in a subprocess as an operator would run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed (pip install 'triton>=3.6,<3.10' numpy)")
pytest.importorskip("numpy", reason="the Triton interpreter needs numpy")

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_writes_every_phase(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "LITTLEBIT_BACKEND": ""}
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--dry-run", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["dry_run"] is True and "errors" not in result, result.get("errors")
    assert {r["kernel"] for r in result["compile"]} == {"_gemv_stage1", "_gemv_stage2", "_gemm_stage1",
                                                        "_gemm_stage2"}
    assert {(r["tokens"], r["dtype"]) for r in result["accuracy"]} == {
        (t, d) for t in (1, 16) for d in ("float16", "bfloat16")}
    assert all(r["ok"] and r["rel_err"] < r["tolerance"] for r in result["accuracy"])
    assert {(r["tokens"], r["bpw"]) for r in result["layers"]} == {(t, b) for t in (1, 16) for b in (1.0, 0.55, 0.1)}
    assert all(r["packed_us"] > 0 and r["dense_us"] > 0 for r in result["layers"])
    (model,) = result["model"]
    assert model["packed_layers"] == 7 and model["littlebit_tokens_per_s"] > 0
    assert {(r["bits"], r["tokens"]) for r in result["group_head"]} == {(b, t) for b in (3, 4) for t in (1, 8)}
    assert all(r["ok"] and r["triton_us"] > 0 and r["chunked_us"] > 0 for r in result["group_head"])
    table = out.with_suffix(".md").read_text()
    assert "| shape | tokens | bpw |" in table and "littlebit_tokens_per_s" in table

"""bench/gpu.py's code paths run anywhere: --smoke on the CPU, as CI runs it (no GPU needed)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_bench_smoke_runs_every_path(tmp_path):
    r = subprocess.run([sys.executable, "bench/gpu.py", "--smoke", "--out", str(tmp_path)], cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["smoke"] and res["device"] == "cpu"
    measured = {(s["amp"], s["channels_last"]) for s in res["step"] if s.get("slices_per_s", 0) > 0}
    assert {("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)} <= measured
    skipped = [s for s in res["step"] if "skipped" in s]
    assert {s["amp"] for s in skipped if not s["compile"]} == {"fp16"} and any(s["compile"] for s in skipped)
    assert [w["workers"] for w in res["loader"]] == [0, 1] and all(w["slices_per_s"] > 0 for w in res["loader"])
    assert res["loader_covers"] > 0
    assert res["ddp"]["processes"] == 2 and res["ddp"]["backend"] == "gloo" and res["ddp"]["seconds"] > 0, res["ddp"]
    assert (tmp_path / "ddp-run" / "metrics.csv").is_file()

"""The benchmarks run (how fast is for the notes, never asserted: these machines are noisy)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          timeout=300, check=False, cwd=REPO)


@pytest.mark.slow
def test_intake_bench_runs_with_two_workers() -> None:
    res = _run(str(REPO / "bench" / "intake.py"), "-n", "60", "-c", "5", "--warmup", "10",
               "--workers", "2", "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    router = report["router"]
    assert router["failed"] == 0 and router["parked"] == 0
    # Every accepted message was routed: the pipeline's figure covers all of them.
    assert router["tickets"] > 0 and report["ratio_accept"] > 0


@pytest.mark.slow
def test_pipeline_bench_runs() -> None:
    res = _run(str(REPO / "bench" / "pipeline.py"), "-n", "40")
    assert res.returncode == 0, res.stderr
    assert "40 messages routed" in res.stdout and "(parked 0)" in res.stdout

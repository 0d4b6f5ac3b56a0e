"""The promise simulation: report structure on short runs, and the targets on the full run."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "simulate.py"


def load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_simulate", BENCH)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


sim = load()
KEYS = {"scenario", "days", "seed", "tickets", "kept_share", "median_slack_hours",
        "median_wait_hours", "slack_wait_ratio", "sla_fallback", "targets_met"}


def check_report(r: dict[str, Any], name: str) -> None:
    assert r.keys() >= KEYS
    assert r["scenario"] == name
    assert r["tickets"] > 50
    assert 0.0 <= r["kept_share"] <= 1.0
    for k in ("median_slack_hours", "median_wait_hours", "slack_wait_ratio"):
        assert isinstance(r[k], float) and math.isfinite(r[k])
    assert r["median_wait_hours"] > 0
    assert -24 < r["median_slack_hours"] < 24
    assert r["unanswered_at_end"] == 0


@pytest.mark.parametrize("name", sim.SCENARIOS)
def test_short_run_structure(name: str) -> None:
    r = sim.run_scenario(name, days=7, seed=3)
    check_report(r, name)
    assert r == sim.run_scenario(name, days=7, seed=3) | {"runtime_seconds":
                                                           r["runtime_seconds"]}


def test_unknown_scenario() -> None:
    with pytest.raises(ValueError, match="unknown scenario"):
        sim.run_scenario("nope", 7, 1)


def test_full_run_meets_the_targets() -> None:
    for name in sim.SCENARIOS:
        r = sim.run_scenario(name, sim.DEFAULT_DAYS, 1)
        check_report(r, name)
        assert r["kept_share"] >= 0.9, r
        assert r["median_slack_hours"] <= 1.5 * r["median_wait_hours"], r
        assert r["targets_met"]


def test_cli_json(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    code = sim.main(["--scenario", "steady", "--days", "7", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out[0]["scenario"] == "steady" and code in (0, 1)

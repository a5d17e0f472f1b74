"""``autellix sim --capacity``: bisection for the highest rate that keeps up, on a tiny workload."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from autellix.sim.__main__ import main
from autellix.sim.capacity import CapacityConfig, CapacitySearch
from autellix.sim.generators import generate
from autellix.sim.simulator import SimConfig


def test_bisection_brackets_the_threshold_within_tol() -> None:
    search = CapacitySearch(generate("bfcl", 5, 0), SimConfig(policy="fcfs"), CapacityConfig(tol=0.02, max_runs=30))
    calls: list[float] = []

    def fake_run(policy: str, memory: str, rate: float) -> dict[str, Any]:
        calls.append(rate)
        return {"keeps_up": rate <= 0.737}

    search.run = fake_run  # type: ignore[method-assign]
    found = search.highest("fcfs", "lru", 0.1, lambda p: p["keeps_up"])
    lo, hi = found["bracket"]
    assert lo <= 0.737 < hi and hi / lo <= 1.02 and found["rate"] == lo and found["bounded"] is None
    found = search.highest("fcfs", "lru", 5.0, lambda p: p["keeps_up"])  # starting above: it comes down
    assert found["rate"] <= 0.737 < found["bracket"][1]
    never = search.highest("fcfs", "lru", 5.0, lambda p: False)
    assert never["rate"] == 0.0 and never["bounded"] == "upper"


def test_capacity_cli_on_a_tiny_workload(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "c.json"
    code = main([
        "--workload", "bfcl", "--capacity", "--policies", "fcfs", "--memory", "tier", "--programs", "40",
        "--kv-scale", "0.05", "--tol", "0.1", "--json", str(out),
    ])
    assert code == 0
    data = json.loads(out.read_text())
    cap = data["capacity"]
    assert set(cap["variants"]) == {"fcfs", "fcfs+tier"}
    runs = {(r["variant"], r["rate"]): r for r in cap["runs"]}
    for name, v in cap["variants"].items():
        lo, hi = v["capacity"]["bracket"]
        assert runs[(name, lo)]["keeps_up"] and not runs[(name, hi)]["keeps_up"]
        assert hi / lo <= 1.1 + 1e-9
        assert v["targets"]["10x"]["rate"] <= lo
        assert set(v["at_fractions"]) == {"0.5", "0.9"}
    assert cap["variants"]["fcfs"]["capacity_ratio"] == 1.0
    assert math.isclose(
        cap["variants"]["fcfs+tier"]["capacity_ratio"],
        cap["variants"]["fcfs+tier"]["capacity"]["rate"] / cap["variants"]["fcfs"]["capacity"]["rate"],
    )
    err = capsys.readouterr()
    assert "keeps up" in err.err and "highest rate that keeps up" in err.out


def test_capacity_needs_no_rates_but_a_grid_does(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--workload", "bfcl", "--json", str(tmp_path / "o.json")]) == 2
    assert "--capacity" in capsys.readouterr().err

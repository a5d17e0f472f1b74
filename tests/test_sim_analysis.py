from __future__ import annotations

import math

import pytest

from autellix.sim.analysis import analyse, crossing_rate, interpolate, parse_targets
from autellix.sim.metrics import measured_slice


def pt(policy: str, rate: float, lat: float, stable: bool = True, thr: float | None = None) -> dict[str, object]:
    return {
        "balancer": "locality", "policy": policy, "rate": rate, "token_latency_s_mean": lat,
        "latency_s_mean": lat * 100, "latency_s_p99": lat * 300, "stable": stable,
        "throughput_programs_s": rate if thr is None else thr,
    }


def test_parse_targets() -> None:
    assert parse_targets("2x, 10x,0.3") == [("2x", 2.0, None), ("10x", 10.0, None), ("0.3s", None, 0.3)]
    for bad in ("", "x", "-1", "0x", "2x,,3"):
        with pytest.raises(ValueError):
            parse_targets(bad)


def test_crossing_is_interpolated_and_bounded() -> None:
    curve = [pt("a", 1, 0.01), pt("a", 2, 0.02), pt("a", 3, 0.06)]
    assert crossing_rate(curve, 0.04, False) == {"rate": 2.5, "bounded": None}
    assert crossing_rate(curve, 1.0, False) == {"rate": 3, "bounded": "lower"}
    assert crossing_rate(curve, 0.001, False) == {"rate": 0.0, "bounded": "upper"}
    unstable = [pt("a", 1, 0.01), pt("a", 2, 0.02, stable=False), pt("a", 3, 0.03, stable=False)]
    assert crossing_rate(unstable, 0.05, True) == {"rate": 1, "bounded": None}
    assert crossing_rate(unstable, 0.05, False)["bounded"] == "lower"


def test_interpolate() -> None:
    curve = [pt("a", 1, 0.01), pt("a", 3, 0.03)]
    assert interpolate(curve, 2, "token_latency_s_mean") == pytest.approx(0.02)
    assert interpolate(curve, 3, "token_latency_s_mean") == pytest.approx(0.03)
    assert interpolate(curve, 4, "token_latency_s_mean") is None


def test_analyse_ratios_to_fcfs() -> None:
    points = [
        pt("fcfs", 1, 0.01), pt("fcfs", 2, 0.05), pt("fcfs", 4, 1.0),
        pt("plas", 1, 0.01), pt("plas", 2, 0.02), pt("plas", 4, 0.07),
    ]
    out = analyse(points, ["fcfs", "plas"], ["locality"], parse_targets("5x"), [1.0])
    sec = out["by_balancer"]["locality"]
    assert out["baseline_token_latency_s"] == 0.01
    t = sec["targets"]["5x"]["policies"]
    assert t["fcfs"]["rate"] == pytest.approx(2.0)
    assert t["plas"]["rate"] == pytest.approx(3.2)
    assert t["plas"]["ratio_to_fcfs"] == pytest.approx(1.6)
    assert sec["fcfs_saturation_programs_s"] == 4
    assert sec["at_fractions_of_fcfs_saturation"]["1"]["policies"]["plas"]["latency_s_mean"] == pytest.approx(7.0)


def test_measured_slice_discards_warmup_and_drain() -> None:
    assert measured_slice(100, 0.1, 0.1) == (10, 90)
    assert measured_slice(5, 0.0, 0.0) == (0, 5)
    with pytest.raises(ValueError):
        measured_slice(10, 0.6, 0.5)
    assert not math.isnan(measured_slice(1, 0.1, 0.1)[1])

"""From a sweep's points to the headline figures: sustainable rates per latency target, ratios to
FCFS, latency at fractions of FCFS's saturation throughput.

- **Baseline**: FCFS's mean program token latency at the lowest rate swept under the first
  balancer listed; the lowest rate should be a light load. All balancers share it, so their
  sustainable rates are read at the same absolute targets and can be compared.
- **Targets**: ``"10x"`` means ten times the baseline; a plain number is seconds per token.
- **Sustainable rate** of a policy under a target: the rate at which its mean program token latency
  crosses the target, interpolated linearly between the last swept rate under it and the first over
  it. When no swept rate exceeds the target the highest rate is reported with ``bounded: "lower"``
  (the true figure is at least that); when even the lowest exceeds it, 0 with ``bounded: "upper"``.
  The *stable* variant treats an unstable point (metrics module) as over the target, so it never
  credits a rate the system cannot actually carry.
- **FCFS saturation throughput**: the most programs/s FCFS completed in any swept run.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

METRIC = "token_latency_s_mean"


def parse_targets(text: str) -> list[tuple[str, float | None, float | None]]:
    """``"2x,5x,0.3"`` -> [(label, multiplier, absolute_seconds)]. Raises ValueError."""
    targets: list[tuple[str, float | None, float | None]] = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            raise ValueError(f"empty item in target list {text!r}")
        try:
            if item.lower().endswith("x"):
                mult = float(item[:-1])
                if not mult > 0:
                    raise ValueError
                targets.append((f"{item[:-1]}x", mult, None))
            else:
                seconds = float(item)
                if not seconds > 0:
                    raise ValueError
                targets.append((f"{item}s", None, seconds))
        except ValueError:
            raise ValueError(f"bad latency target {item!r}: use a multiple like 10x or seconds per token") from None
    return targets


def _curve(points: Sequence[dict[str, Any]], balancer: str, variant: str) -> list[dict[str, Any]]:
    """One variant's points by rate; a variant is a policy, or ``policy+memory`` (sweep.variant_name)."""
    return sorted(
        (p for p in points if p["balancer"] == balancer and p.get("variant", p["policy"]) == variant),
        key=lambda p: p["rate"],
    )


def crossing_rate(curve: Sequence[dict[str, Any]], target: float, stable_only: bool) -> dict[str, Any]:
    """Where ``curve``'s mean token latency crosses ``target`` (see module docstring)."""
    prev: dict[str, Any] | None = None
    for p in curve:
        value = p[METRIC]
        over = not (value <= target) or (stable_only and not p["stable"])
        if over:
            if prev is None:
                return {"rate": 0.0, "bounded": "upper"}
            lo, hi = prev[METRIC], value
            if (stable_only and not p["stable"]) or not math.isfinite(hi) or hi <= lo:
                return {"rate": prev["rate"], "bounded": None}
            frac = (target - lo) / (hi - lo)
            return {"rate": prev["rate"] + frac * (p["rate"] - prev["rate"]), "bounded": None}
        prev = p
    if prev is None:
        return {"rate": math.nan, "bounded": None}
    return {"rate": prev["rate"], "bounded": "lower"}


def interpolate(curve: Sequence[dict[str, Any]], rate: float, key: str) -> float | None:
    """``key`` at ``rate``, linear between the swept rates around it; None outside them."""
    for a, b in itertools.pairwise(curve):
        if a["rate"] <= rate <= b["rate"]:
            if b["rate"] == a["rate"]:
                return float(a[key])
            w = (rate - a["rate"]) / (b["rate"] - a["rate"])
            return float(a[key] + w * (b[key] - a[key]))
    if curve and math.isclose(curve[-1]["rate"], rate):
        return float(curve[-1][key])
    return None


def analyse(
    points: Sequence[dict[str, Any]],
    policies: Sequence[str],
    balancers: Sequence[str],
    targets: Sequence[tuple[str, float | None, float | None]],
    fractions: Sequence[float],
    baseline_variant: str = "fcfs",
) -> dict[str, Any]:
    """``policies``: the variants to compare (policy names, or ``policy+memory``); the ratios are to
    ``baseline_variant``, which must be among them. The output keeps the key ``ratio_to_fcfs``."""
    first = _curve(points, balancers[0], baseline_variant)
    if not first:
        raise ValueError("the analysis needs FCFS in the sweep")
    baseline = first[0][METRIC]
    out: dict[str, Any] = {"metric": METRIC, "baseline_token_latency_s": baseline, "by_balancer": {}}
    for lb in balancers:
        fcfs = _curve(points, lb, baseline_variant)
        saturation = max(p["throughput_programs_s"] for p in fcfs)
        section: dict[str, Any] = {
            "fcfs_lowest_rate_token_latency_s": fcfs[0][METRIC],
            "fcfs_saturation_programs_s": saturation,
            "targets": {},
            "at_fractions_of_fcfs_saturation": {},
        }
        for label, mult, absolute in targets:
            target = baseline * mult if mult is not None else float(absolute)  # type: ignore[arg-type]
            per_policy: dict[str, Any] = {}
            for stable_only in (False, True):
                rates = {pol: crossing_rate(_curve(points, lb, pol), target, stable_only) for pol in policies}
                base_rate = rates[baseline_variant]["rate"]
                for pol, r in rates.items():
                    ratio = r["rate"] / base_rate if base_rate and base_rate > 0 else None
                    entry = per_policy.setdefault(pol, {})
                    suffix = "_stable" if stable_only else ""
                    entry[f"rate{suffix}"] = r["rate"]
                    entry[f"bounded{suffix}"] = r["bounded"]
                    entry[f"ratio_to_fcfs{suffix}"] = ratio
            section["targets"][label] = {"token_latency_s": target, "policies": per_policy}
        for f in fractions:
            rate = f * saturation
            section["at_fractions_of_fcfs_saturation"][f"{f:g}"] = {
                "rate": rate,
                "policies": {
                    pol: {
                        "latency_s_mean": interpolate(_curve(points, lb, pol), rate, "latency_s_mean"),
                        "latency_s_p99": interpolate(_curve(points, lb, pol), rate, "latency_s_p99"),
                        "token_latency_s_mean": interpolate(_curve(points, lb, pol), rate, METRIC),
                    }
                    for pol in policies
                },
            }
        out["by_balancer"][lb] = section
    if len(balancers) > 1 and "round-robin" in balancers:
        comparisons: dict[str, Any] = {}
        rr = out["by_balancer"]["round-robin"]["targets"]
        for lb in balancers:
            if lb == "round-robin":
                continue
            mine = out["by_balancer"][lb]["targets"]
            comparisons[lb] = {
                label: {
                    pol: _ratio(mine[label]["policies"][pol]["rate"], rr[label]["policies"][pol]["rate"])
                    for pol in policies
                }
                for label in mine
            }
        out["balancer_ratio_to_round_robin"] = comparisons
    return out


def _ratio(a: float, b: float) -> float | None:
    return a / b if b and b > 0 and math.isfinite(a) else None

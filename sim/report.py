"""Printing and plotting a sweep: per-point table, sustainable rates, latency at fractions."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def _f(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def points_table(points: Sequence[dict[str, Any]]) -> str:
    head = (
        f"{'balancer':<11} {'variant':<12} {'rate/s':>7} | {'lat mean':>8} {'p50':>7} {'p95':>7} {'p99':>7} s"
        f" | {'tok-lat':>8} {'p99':>7} s/tok | {'TTFT':>6} {'p99':>6} s | {'prog/s':>7} {'tok/s':>7}"
        f" {'stable':>6} {'wait%':>5} {'hit%':>5}"
    )
    lines = [head, "-" * len(head)]
    for p in sorted(points, key=lambda p: (p["balancer"], p["policy"], p.get("memory", ""), p["rate"])):
        lines.append(
            f"{p['balancer']:<11} {p.get('variant', p['policy']):<12} {_f(p['rate']):>7} | {_f(p['latency_s_mean']):>8}"
            f" {_f(p['latency_s_p50']):>7} {_f(p['latency_s_p95']):>7} {_f(p['latency_s_p99']):>7}  "
            f" | {_f(p['token_latency_s_mean']):>8} {_f(p['token_latency_s_p99']):>7}      "
            f" | {_f(p['ttft_s_mean']):>6} {_f(p['ttft_s_p99']):>6}  "
            f" | {_f(p['throughput_programs_s']):>7} {_f(p['throughput_tokens_s'], 4):>7}"
            f" {'yes' if p['stable'] else 'NO':>6} {100 * p['wait_fraction']:>5.1f} {100 * p['prefix_hit_rate']:>5.1f}"
        )
    return "\n".join(lines)


def _rate(entry: dict[str, Any], suffix: str) -> str:
    r = entry[f"rate{suffix}"]
    b = entry[f"bounded{suffix}"]
    prefix = ">=" if b == "lower" else ("<" if b == "upper" else "")
    ratio = entry[f"ratio_to_fcfs{suffix}"]
    rs = "-" if ratio is None else f"{'>=' if b == 'lower' else ''}{ratio:.2f}x"
    return f"{prefix}{_f(r)} ({rs})"


def analysis_text(analysis: dict[str, Any], policies: Sequence[str]) -> str:
    lines = [f"baseline: FCFS mean program token latency at the lowest rate = "
             f"{analysis['baseline_token_latency_s']:.4g} s/token"]
    for lb, sec in analysis["by_balancer"].items():
        lines.append("")
        lines.append(f"[{lb}] FCFS saturation throughput {sec['fcfs_saturation_programs_s']:.3g} programs/s")
        lines.append("max sustainable rate (programs/s) per mean token-latency target, (ratio to FCFS);")
        lines.append("  'stable' also requires the run to keep up with its offered load")
        for label, t in sec["targets"].items():
            lines.append(f"  target {label} = {t['token_latency_s']:.4g} s/token")
            for pol in policies:
                e = t["policies"][pol]
                lines.append(f"    {pol:<12} {_rate(e, ''):<24} stable: {_rate(e, '_stable')}")
        lines.append("latency at fractions of FCFS saturation throughput (mean / p99 program latency, s)")
        for frac, block in sec["at_fractions_of_fcfs_saturation"].items():
            cells = [
                f"{pol} {_f(v['latency_s_mean'])}/{_f(v['latency_s_p99'])}" for pol, v in block["policies"].items()
            ]
            lines.append(f"  {frac}x ({block['rate']:.3g}/s): " + "  ".join(cells))
    if "balancer_ratio_to_round_robin" in analysis:
        lines.append("")
        lines.append("sustainable rate relative to round-robin (same absolute targets)")
        for lb, per_target in analysis["balancer_ratio_to_round_robin"].items():
            for label, per_pol in per_target.items():
                cells = [f"{pol} {_f(r)}" for pol, r in per_pol.items()]
                lines.append(f"  {lb} @ {label}: " + "  ".join(cells))
    return "\n".join(lines)


def plot(points: Sequence[dict[str, Any]], analysis: dict[str, Any], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    balancers = list(analysis["by_balancer"])
    fig, axes = plt.subplots(1, len(balancers), figsize=(6 * len(balancers), 4.5), squeeze=False)
    for ax, lb in zip(axes[0], balancers, strict=True):
        for pol in dict.fromkeys(p["policy"] for p in points):
            curve = sorted((p for p in points if p["balancer"] == lb and p["policy"] == pol), key=lambda p: p["rate"])
            ax.plot([p["rate"] for p in curve], [p["token_latency_s_mean"] for p in curve], marker="o", label=pol)
        for label, t in analysis["by_balancer"][lb]["targets"].items():
            ax.axhline(t["token_latency_s"], color="grey", linestyle=":", linewidth=0.8)
            ax.annotate(label, (0, t["token_latency_s"]), xycoords=("axes fraction", "data"), fontsize=7)
        ax.set_yscale("log")
        ax.set_xlabel("program arrival rate (programs/s)")
        ax.set_ylabel("mean program token latency (s/token)")
        ax.set_title(f"{title} [{lb}]" if len(balancers) > 1 else title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

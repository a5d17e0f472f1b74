from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from autellix.sim.__main__ import main
from autellix.sim.cli import register
from autellix.sim.generators import generate
from autellix.sim.trace import write_trace


def test_register_adds_a_sim_subcommand() -> None:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["sim", "--workload", "bfcl", "--rates", "1", "--json", "x.json"])
    assert args.command == "sim" and callable(args.func)


def test_end_to_end_writes_json_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, png = tmp_path / "o.json", tmp_path / "o.png"
    code = main([
        "--workload", "bfcl", "--policies", "plas,srpt", "--rates", "0.5,4,40", "--programs", "40",
        "--engines", "2", "--lb", "round-robin,locality", "--json", str(out), "--plot", str(png),
        "--kv-scale", "0.1", "--no-progress",
    ])
    assert code == 0
    data = json.loads(out.read_text())
    assert data["kv_capacity_tokens"] == 40_000 and data["carry_context"] is True
    assert len(data["points"]) == 2 * 3 * 3  # fcfs is always added
    point = data["points"][0]
    for key in ("latency_s_mean", "latency_s_p50", "latency_s_p95", "latency_s_p99", "token_latency_s_mean",
                "ttft_s_mean", "throughput_programs_s", "throughput_tokens_s", "stable"):
        assert key in point
    analysis = data["analysis"]
    assert set(analysis["by_balancer"]) == {"round-robin", "locality"}
    t10 = analysis["by_balancer"]["locality"]["targets"]["10x"]
    assert t10["policies"]["fcfs"]["ratio_to_fcfs"] == 1.0
    assert "balancer_ratio_to_round_robin" in analysis
    assert png.stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "max sustainable rate" in printed and "target 10x" in printed


def test_trace_workload_and_trace_out(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    write_trace(trace, generate("sharegpt", 20, seed=1))
    again = tmp_path / "again.jsonl"
    code = main(["--workload", str(trace), "--policies", "fcfs", "--rates", "1,2", "--json",
                 str(tmp_path / "o.json"), "--trace-out", str(again), "--no-progress", "--quiet"])
    assert code == 0
    assert len(again.read_text().splitlines()) == 20


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--workload", "nope", "--rates", "1"], "unknown workload 'nope'"),
        (["--workload", "missing.jsonl", "--rates", "1"], "trace file not found"),
        (["--workload", "bfcl", "--rates", "1,x"], "'x' is not a number"),
        (["--workload", "bfcl", "--rates", "1,-2"], "not a positive rate"),
        (["--workload", "bfcl", "--rates", ""], "bad --rates"),
        (["--workload", "bfcl", "--rates", "1", "--policies", "lifo"], "unknown policy 'lifo'"),
        (["--workload", "bfcl", "--rates", "1", "--lb", "random"], "unknown balancer 'random'"),
        (["--workload", "bfcl", "--rates", "1", "--targets", "fast"], "bad latency target"),
        (["--workload", "bfcl", "--rates", "1", "--programs", "ten"], "not an integer"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code = main([*argv, "--json", str(tmp_path / "o.json"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_bad_trace_content_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "p"}\n')
    assert main(["--workload", str(bad), "--rates", "1", "--json", str(tmp_path / "o.json")]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:1" in err and len(err.strip().splitlines()) == 1

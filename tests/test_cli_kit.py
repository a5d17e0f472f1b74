"""The command-line toolkit `autellix sim` and `autellix bench` share."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest

from autellix.sim import cli_kit as kit


def test_rates_are_sorted_once_and_positive() -> None:
    assert kit.parse_rates("2, 0.5,2") == [0.5, 2.0]
    for bad, message in [("", "expected a comma list"), ("1,x", "'x' is not a number"), ("1,0", "not a positive")]:
        with pytest.raises(kit.UsageError, match=message):
            kit.parse_rates(bad, "--rate")


def test_names_keep_their_first_order_and_refuse_unknown_ones() -> None:
    assert kit.parse_names("b, a,b", ("a", "b"), "policy", "--p") == ["b", "a"]
    with pytest.raises(kit.UsageError, match="unknown policy 'c' in --p; expected a, b"):
        kit.parse_names("a,c", ("a", "b"), "policy", "--p")
    with pytest.raises(kit.UsageError, match="no policy given"):
        kit.parse_names(" , ", ("a",), "policy", "--p")


def test_numbers_are_checked() -> None:
    assert kit.parse_number("3", "--n", int, 1) == 3
    for text, cast, message in [("x", int, "not an integer"), ("nan", float, "finite"), ("0", int, ">= 1")]:
        with pytest.raises(kit.UsageError, match=message):
            kit.parse_number(text, "--n", cast, 1)
    with pytest.raises(kit.UsageError, match="below 1"):
        kit.parse_steady_state("0.5", "0.5")


def test_json_is_strict(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    kit.write_json(str(out), {1: (math.inf, 2.0), "x": [math.nan]})
    assert json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(c)) == {"1": [None, 2.0], "x": [None]}


def test_read_input_reports_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    def bad() -> None:
        raise kit.UsageError("nope")

    def missing() -> None:
        raise FileNotFoundError(2, "No such file or directory")

    assert kit.read_input("autellix x", "w.jsonl", bad) is None
    assert kit.read_input("autellix x", "w.jsonl", missing) is None
    assert kit.read_input("autellix x", "w.jsonl", lambda: 7) == 7
    assert capsys.readouterr().err.splitlines() == [
        "autellix x: error: nope",
        "autellix x: error: cannot read w.jsonl: No such file or directory",
    ]


def test_both_commands_take_the_shared_flags() -> None:
    from autellix.bench.cli import add_arguments as bench_arguments
    from autellix.sim.cli import add_arguments as sim_arguments

    for add in (sim_arguments, bench_arguments):
        p = argparse.ArgumentParser()
        add(p)
        args = p.parse_args(["--workload", "bfcl", "--json", "o.json", "--rates", "1", "--no-context", "--seed", "3"])
        assert (args.no_context, args.seed, args.warmup, args.no_progress) == (True, "3", "0.1", False)

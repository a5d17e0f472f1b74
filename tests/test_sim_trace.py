from __future__ import annotations

from pathlib import Path

import pytest

from autellix.sim.generators import generate
from autellix.sim.trace import read_trace, write_trace
from autellix.sim.workload import WorkloadError


def test_round_trip(tmp_path: Path) -> None:
    programs = generate("mixed", 12, seed=2)
    path = tmp_path / "t.jsonl"
    assert write_trace(path, programs) == 12
    assert read_trace(path) == programs


def test_defaults_and_sorting(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(
        "# a comment\n"
        '{"id": "late", "arrival_s": 5, "calls": [{"id": "a", "prompt_tokens": 3, "output_tokens": 2}]}\n'
        "\n"
        '{"id": "early", "arrival_s": 1, "calls": [{"id": "a", "prompt_tokens": 3, "output_tokens": 2},'
        ' {"id": "b", "parents": ["a"], "prompt_tokens": 1, "output_tokens": 1, "think_s": 0.5}]}\n'
    )
    early, late = read_trace(path)
    assert (early.program_id, late.program_id) == ("early", "late")
    assert early.calls[1].context_parent == "a"  # defaults to the first parent
    assert early.calls[1].think_s == 0.5 and early.calls[0].parents == ()


@pytest.mark.parametrize(
    "line",
    [
        "not json",
        '{"calls": []}',
        '{"id": "p", "calls": []}',
        '{"id": "p", "calls": [{"id": "a", "prompt_tokens": "3", "output_tokens": 2}]}',
        '{"id": "p", "calls": [{"id": "a", "parents": ["zz"], "prompt_tokens": 3, "output_tokens": 2}]}',
    ],
)
def test_bad_lines_name_the_line(tmp_path: Path, line: str) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(WorkloadError, match=r"t\.jsonl:1"):
        read_trace(path)


def test_empty_and_duplicate(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text("\n")
    with pytest.raises(WorkloadError, match="no programs"):
        read_trace(path)
    one = '{"id": "p", "calls": [{"id": "a", "prompt_tokens": 3, "output_tokens": 2}]}\n'
    path.write_text(one + one)
    with pytest.raises(WorkloadError, match="duplicate"):
        read_trace(path)

"""What ``autellix sim`` and ``autellix bench`` share on the command line: parsing numbers and comma
lists into typed options, the one-line usage error (exit 2, no traceback), JSON that has no NaN, and
progress on stderr."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from autellix.sim.analysis import parse_targets
from autellix.sim.generators import WORKLOAD_NAMES
from autellix.sim.workload import WorkloadError

T = TypeVar("T")


class UsageError(ValueError):
    """Bad command-line input: reported in one line, exit code 2."""


def register_command(
    subparsers: Any,
    name: str,
    help_text: str,
    description: str,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], int],
) -> None:
    """Add a sub-command (``autellix sim``, ``autellix bench``) whose description keeps its lines."""
    p = subparsers.add_parser(
        name, help=help_text, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(p)
    p.set_defaults(func=run)


def add_workload_arguments(p: argparse.ArgumentParser, plot_help: str) -> None:
    """The flags both commands take: the programs (workload, seed, think time), the steady-state
    window, and where the figures go."""
    p.add_argument("--workload", required=True, help=f"{'|'.join(WORKLOAD_NAMES)} or PATH.jsonl (a trace)")
    p.add_argument("--seed", default="0", help="workload seed (default %(default)s)")
    p.add_argument("--think-scale", default="1.0", help="multiply the generators' think times")
    p.add_argument("--no-context", action="store_true", help="a prompt is its call's new input only (no history)")
    p.add_argument("--warmup", default="0.1", help="fraction of programs left out of the figures at the start")
    p.add_argument("--drain", default="0.1", help="fraction of programs left out of the figures at the end")
    p.add_argument("--json", required=True, metavar="OUT.json", help="write every figure here")
    p.add_argument("--plot", metavar="OUT.png", help=plot_help)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def parse_number(text: str, what: str, cast: type = float, minimum: float | None = None) -> Any:
    try:
        value = cast(text)
    except ValueError:
        raise UsageError(f"bad {what} {text!r}: not a{'n integer' if cast is int else ' number'}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise UsageError(f"bad {what} {text!r}: must be finite")
    if minimum is not None and value < minimum:
        raise UsageError(f"bad {what} {text!r}: must be >= {minimum:g}")
    return value


def parse_numbers(text: str, what: str, cast: type = float, minimum: float | None = None) -> list[Any]:
    """A comma list of numbers, each checked as :func:`parse_number` does."""
    return [parse_number(x.strip(), what, cast, minimum) for x in text.split(",")]


def parse_names(text: str, known: Sequence[str], what: str, flag: str) -> list[str]:
    """A comma list of names out of ``known``, first occurrence kept, at least one."""
    names = [x.strip() for x in text.split(",") if x.strip()]
    if not names:
        raise UsageError(f"no {what} given to {flag}")
    for n in names:
        if n not in known:
            raise UsageError(f"unknown {what} {n!r} in {flag}; expected {', '.join(known)}")
    return list(dict.fromkeys(names))


def parse_rates(text: str, flag: str = "--rates") -> list[float]:
    """Program arrival rates: a comma list of positive numbers, sorted, each once."""
    items = [x.strip() for x in text.split(",")]
    if not items or any(not x for x in items):
        raise UsageError(f"bad {flag} {text!r}: expected a comma list of positive numbers")
    rates = []
    for x in items:
        try:
            r = float(x)
        except ValueError:
            raise UsageError(f"bad {flag} {text!r}: {x!r} is not a number") from None
        if not (math.isfinite(r) and r > 0):
            raise UsageError(f"bad {flag} {text!r}: {x!r} is not a positive rate")
        rates.append(r)
    return sorted(set(rates))


def check_workload(workload: str) -> str:
    """A generator's name, or the path of a JSONL trace that exists."""
    if workload not in WORKLOAD_NAMES:
        if not workload.endswith(".jsonl") and not os.path.exists(workload):
            raise UsageError(f"unknown workload {workload!r}; expected {', '.join(WORKLOAD_NAMES)} or a .jsonl trace")
        if not os.path.isfile(workload):
            raise UsageError(f"trace file not found: {workload}")
    return workload


def parse_steady_state(warmup: str, drain: str) -> tuple[float, float]:
    """The fractions of programs left out at the start and at the end."""
    w, d = parse_number(warmup, "--warmup", float, 0.0), parse_number(drain, "--drain", float, 0.0)
    if w + d >= 1.0:
        raise UsageError("--warmup plus --drain must be below 1")
    return w, d


def parse_latency_targets(text: str) -> list[tuple[str, float | None, float | None]]:
    try:
        return parse_targets(text)
    except ValueError as e:
        raise UsageError(str(e)) from None


def read_input(prog: str, workload: str, read: Callable[[], T]) -> T | None:
    """``read()`` (parse the options, read the workload); on bad input one line on stderr and None."""
    try:
        return read()
    except (UsageError, WorkloadError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
    except OSError as e:
        print(f"{prog}: error: cannot read {workload}: {e.strerror or e}", file=sys.stderr)
    return None


def jsonable(x: Any) -> Any:
    """``x`` with string keys, lists for tuples, and None for NaN and infinities (strict JSON)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_json(path: str, report: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(jsonable(report), f, indent=1)


def progress_bar(total: int, desc: str, unit: str, disable: bool) -> Any:
    """A tqdm bar on stderr (off with ``--no-progress``)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=disable)

"""JSONL program traces: one program per line. Writer and reader.

Each line is a JSON object::

    {"id": "p0", "arrival_s": 0.0, "kind": "sharegpt",
     "calls": [
       {"id": "c0", "parents": [], "context_parent": null,
        "prompt_tokens": 212, "output_tokens": 301, "think_s": 0.0},
       {"id": "c1", "parents": ["c0"], "context_parent": "c0",
        "prompt_tokens": 87, "output_tokens": 155, "think_s": 1.3}
     ]}

- ``id`` (string, required): the program id, unique in the file.
- ``arrival_s`` (number >= 0, default 0): arrival time in seconds. When every program has the same
  arrival the simulator draws Poisson arrivals; otherwise it rescales the gaps to each ``--rates``
  value, keeping the trace's burstiness.
- ``kind`` (string, optional): a label reported per kind (e.g. the generator's workload name).
- ``calls`` (non-empty list, parents first), each with
  - ``id`` (string, required): unique within the program;
  - ``parents`` (list of earlier call ids, default ``[]``): the call is submitted when all have
    completed, ``think_s`` later; a call without parents is submitted ``think_s`` after arrival;
  - ``context_parent`` (an earlier call id or null; default: the first parent, or null): the call
    whose prompt and output this call's prompt extends when context carrying is on;
  - ``prompt_tokens`` (int >= 1, required): the call's *new* input tokens;
  - ``output_tokens`` (int >= 1, required): tokens the call generates;
  - ``think_s`` (number >= 0, default 0): think or tool time before the call is submitted.

Blank lines and lines starting with ``#`` are skipped. See also ``sim/TRACE_FORMAT.md``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from autellix.sim.workload import CallSpec, ProgramSpec, WorkloadError, validate


def program_to_json(p: ProgramSpec) -> dict[str, Any]:
    return {
        "id": p.program_id,
        "arrival_s": p.arrival_s,
        "kind": p.kind,
        "calls": [
            {
                "id": c.call_id,
                "parents": list(c.parents),
                "context_parent": c.context_parent,
                "prompt_tokens": c.new_prompt_tokens,
                "output_tokens": c.output_tokens,
                "think_s": c.think_s,
            }
            for c in p.calls
        ],
    }


def write_trace(path: str | Path, programs: Iterable[ProgramSpec]) -> int:
    """Write ``programs`` as JSONL; returns the number of lines written."""
    n = 0
    with Path(path).open("w", encoding="utf-8") as f:
        for p in programs:
            f.write(json.dumps(program_to_json(p), separators=(",", ":")) + "\n")
            n += 1
    return n


def _int(obj: dict[str, Any], key: str, where: str) -> int:
    v = obj.get(key)
    if isinstance(v, bool) or not isinstance(v, int):
        raise WorkloadError(f"{where}: {key!r} must be an integer")
    return v


def _num(obj: dict[str, Any], key: str, where: str, default: float) -> float:
    v = obj.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise WorkloadError(f"{where}: {key!r} must be a number")
    return float(v)


def program_from_json(obj: Any, where: str = "program") -> ProgramSpec:
    if not isinstance(obj, dict):
        raise WorkloadError(f"{where}: expected a JSON object")
    pid = obj.get("id")
    if not isinstance(pid, str) or not pid:
        raise WorkloadError(f"{where}: 'id' must be a non-empty string")
    raw_calls = obj.get("calls")
    if not isinstance(raw_calls, list) or not raw_calls:
        raise WorkloadError(f"{where}: 'calls' must be a non-empty list")
    calls = []
    for j, rc in enumerate(raw_calls):
        cw = f"{where} call {j}"
        if not isinstance(rc, dict):
            raise WorkloadError(f"{cw}: expected a JSON object")
        cid = rc.get("id")
        if not isinstance(cid, str) or not cid:
            raise WorkloadError(f"{cw}: 'id' must be a non-empty string")
        parents = rc.get("parents", [])
        if not isinstance(parents, list) or not all(isinstance(x, str) for x in parents):
            raise WorkloadError(f"{cw}: 'parents' must be a list of call ids")
        ctx = rc.get("context_parent", parents[0] if parents else None)
        if ctx is not None and not isinstance(ctx, str):
            raise WorkloadError(f"{cw}: 'context_parent' must be a call id or null")
        calls.append(
            CallSpec(
                call_id=cid,
                parents=tuple(parents),
                new_prompt_tokens=_int(rc, "prompt_tokens", cw),
                output_tokens=_int(rc, "output_tokens", cw),
                think_s=_num(rc, "think_s", cw, 0.0),
                context_parent=ctx,
            )
        )
    kind = obj.get("kind", "")
    program = ProgramSpec(
        program_id=pid,
        arrival_s=_num(obj, "arrival_s", where, 0.0),
        calls=tuple(calls),
        kind=kind if isinstance(kind, str) else str(kind),
    )
    try:
        validate(program)
    except WorkloadError as e:
        raise WorkloadError(f"{where}: {e}") from None
    return program


def read_trace(path: str | Path) -> list[ProgramSpec]:
    """Read a JSONL trace; raises :class:`WorkloadError` (a ``ValueError``) on bad content and
    ``OSError`` when the file cannot be read. Programs are returned sorted by arrival time."""
    programs: list[ProgramSpec] = []
    ids: set[str] = set()
    with Path(path).open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise WorkloadError(f"{where}: not valid JSON ({e.msg})") from None
            p = program_from_json(obj, where)
            if p.program_id in ids:
                raise WorkloadError(f"{where}: duplicate program id {p.program_id!r}")
            ids.add(p.program_id)
            programs.append(p)
    if not programs:
        raise WorkloadError(f"{path}: no programs")
    programs.sort(key=lambda p: p.arrival_s)
    return programs

"""What validating every input at the edge costs (issue 11): the shape check (size and JSON depth)
and a scheduler's whole parse of a submission, typical and hostile.

    python -m autellix.bench.input_limits [--repeat 2000]

Prints microseconds per message, the median of ``--repeat`` runs (hostile 1 MB cases: of 20).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

from autellix.proto.limits import check_shape
from autellix.services.scheduler.core import RejectedCall, SchedulerCore


def _median_us(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        try:
            fn()
        except (RejectedCall, ValueError):
            pass  # the hostile cases are meant to be refused; what they cost is the figure
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2000)
    args = parser.parse_args()
    prompt = " ".join(f"word{i}" for i in range(256))  # about a 256-token prompt
    typical = json.dumps(
        {"program_id": "prog-1", "call_id": "c-1", "reply_to": "_INBOX.abc.def", "max_tokens": 128,
         "messages": [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": prompt}]}
    ).encode()  # fmt: skip
    flat = b"[" + b"[]," * 300_000 + b"[]]"  # 1 MB of brackets, 2 deep: the exact check's worst case
    deep = b'{"program_id": "p", "prompt": "x", "a": ' + b"[" * 1000 + b"]" * 1000 + b"}"
    bad_reply = json.dumps({"program_id": "p", "prompt": "x", "reply_to": "x" * 5000}).encode()
    core = SchedulerCore()
    rows = [
        (f"check_shape, typical submission ({len(typical)} B)", _median_us(lambda: check_shape(typical), args.repeat)),
        ("SchedulerCore.parse, typical submission", _median_us(lambda: core.parse(typical, "r"), args.repeat)),
        ("SchedulerCore.parse, 1,000-deep JSON (bad_json)", _median_us(lambda: core.parse(deep, "r"), args.repeat)),
        ("SchedulerCore.parse, 5,000-char reply_to (bad_field)", _median_us(lambda: core.parse(bad_reply, "r"),
                                                                              args.repeat)),
        ("check_shape, 1 MB of 2-deep brackets", _median_us(lambda: check_shape(flat), 20)),
    ]  # fmt: skip
    for name, us in rows:
        print(f"{name:58s} {us:10.1f} us")


if __name__ == "__main__":
    main()

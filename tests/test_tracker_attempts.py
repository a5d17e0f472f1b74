"""Every attempt of a call counts its service once, in whatever order the attempts' events arrive.

A call can run more than once: an engine drains and hands it back (``handback``, resumed elsewhere), or
the caller lost replies and resubmitted while the older attempt still ran (the engine ends that one as
an ``abort``). The program's attained service is the engine time all of them took; the call counts once.
"""

from __future__ import annotations

import itertools

import msgspec
import pytest
from eventkit import completed

from autellix.proto import CallCompleted, FinishReason
from autellix.proto.messages import completed_message_id
from autellix.services.tracker.process_table import ProcessTable, ProgramRecord, from_record, to_record


def _done(attempt: int, reason: str, service_s: float, engine: str = "e0", call_id: str = "c1") -> CallCompleted:
    return completed("p", call_id, service_s, engine_id=engine, finish_reason=reason, attempt=attempt)


ATTEMPTS = [
    _done(0, FinishReason.ABORT, 0.25, "e0"),  # replaced by the caller's resubmission
    _done(1, FinishReason.HANDBACK, 0.5, "e1"),  # the resubmission, handed back by a draining engine
    _done(2, FinishReason.STOP, 1.0, "e2"),  # and finished on a third
]


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_each_attempt_counts_once_in_any_order(order: tuple[int, ...]) -> None:
    table = ProcessTable()
    for i in order:
        table.on_completed(ATTEMPTS[i], 1.0)
        table.on_completed(ATTEMPTS[i], 1.1)  # redelivered (a tracker restart between apply and ack)
    entry = table.get("p")
    assert entry is not None
    assert entry.account.service_s == pytest.approx(1.75)
    assert entry.account.calls_completed == 1
    assert entry.account.call_path_s["c1"] == pytest.approx(1.75)
    assert entry.engines == {"e0", "e1", "e2"}


def test_a_later_attempt_publishes_the_grown_service() -> None:
    table = ProcessTable()
    first = table.on_completed(_done(0, FinishReason.ABORT, 0.25), 1.0)
    later = table.on_completed(_done(1, FinishReason.STOP, 1.0, "e1"), 2.0)
    assert first is not None and later is not None
    assert (first.program_service_s, later.program_service_s) == pytest.approx((0.25, 1.25))
    assert later.call_path_s == pytest.approx(1.25)
    assert table.on_completed(_done(1, FinishReason.STOP, 1.0, "e1"), 3.0) is None  # a duplicate: no update


def test_attempt_zero_calls_keep_no_mask_and_older_engines_dedupe_as_before() -> None:
    table = ProcessTable()
    table.on_completed(_done(0, FinishReason.STOP, 0.5, call_id="a"), 1.0)
    legacy = msgspec.structs.replace(_done(0, FinishReason.STOP, 0.5, call_id="b"), attempt=None)
    table.on_completed(legacy, 1.0)
    table.on_completed(legacy, 1.1)
    entry = table.get("p")
    assert entry is not None and entry.attempt_masks == {}
    assert entry.account.service_s == pytest.approx(1.0)


def test_the_attempts_counted_survive_a_tracker_restart() -> None:
    table = ProcessTable()
    table.on_completed(ATTEMPTS[0], 1.0)
    table.on_completed(ATTEMPTS[2], 1.0)
    entry = table.get("p")
    assert entry is not None
    record = msgspec.json.decode(msgspec.json.encode(to_record(entry)), type=ProgramRecord)
    restored = ProcessTable()
    restored.restore(from_record(record, 2.0))
    for event in ATTEMPTS:  # the stream redelivers all three; only the handback is new
        restored.on_completed(event, 2.0)
    again = restored.get("p")
    assert again is not None and again.account.service_s == pytest.approx(1.75)
    assert again.account.calls_completed == 1


def test_two_attempts_ending_alike_on_one_engine_have_distinct_message_ids() -> None:
    older, newer = _done(0, FinishReason.ABORT, 0.1), _done(1, FinishReason.ABORT, 0.2)
    assert completed_message_id(older) == "e0:c1:abort"  # unchanged for attempt 0
    assert completed_message_id(newer) == "e0:c1:1:abort"

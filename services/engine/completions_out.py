"""Completed events that survive a broker node's death: published to JetStream, acknowledged.

A completed event is what the tracker counts a program's service from. A plain publish is
at-most-once: published on a connection to a node that dies a moment later it is gone, and the
program's service with it (seen on a 3-node cluster). So engines publish each event with JetStream
(``Nats-Msg-Id`` set, so a retry that did land counts once) and retry until the stream acknowledges
it, on the connection's next node if need be, in the background so the step loop never waits.

Where no stream captures the subject (no JetStream, or a tracker without persistence) there is no
acknowledgement to wait for: the event goes out as a plain publish. Which case holds is learnt from
the broker (the stream's info, looked up again every few seconds, in the background) and, for the
first events, from the publish itself: with no stream, a JetStream publish reaches the trackers' and
schedulers' plain subscriptions as an ordinary message (it was delivered) and times out for want of
an acknowledgement, so a timeout is followed by a look at the stream, not by a blind retry, which
would deliver the event again every retry for a minute.
"""

from __future__ import annotations

import asyncio

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS

from autellix.proto import CallCompleted, Subjects, encode
from autellix.proto.messages import completed_message_id
from autellix.services.log_throttle import LogThrottle
from autellix.services.tracker.completions import stream_name

#: how long one event is retried before it is given up (logged)
RETRY_FOR_S = 60.0
#: events being retried at once; past this, new ones go out as plain publishes
MAX_PENDING = 10_000
#: how often whether the stream exists is looked up again
STREAM_CHECK_S = 5.0


class CompletionOutbox:
    def __init__(self, nc: NATS, subjects: Subjects, log: object) -> None:
        self.nc = nc
        self.subjects = subjects
        self.log = log
        self.js = nc.jetstream()
        self.stream = stream_name(subjects.root)
        self._pending: set[asyncio.Task[None]] = set()
        self._throttle = LogThrottle()
        #: whether the completions stream exists (None: not known yet, publish as if it did)
        self.stream_exists: bool | None = None
        self._checked_at = -STREAM_CHECK_S
        self._checking: asyncio.Task[None] | None = None

    async def send(self, event: CallCompleted) -> None:
        data = encode(event)
        headers = {"Nats-Msg-Id": completed_message_id(event)}
        subject = self.subjects.call_completed_for(event.program_id)  # the program's slot: its tracker shard
        loop = asyncio.get_running_loop()
        if loop.time() - self._checked_at >= STREAM_CHECK_S and self._checking is None:
            self._checked_at = loop.time()
            self._checking = loop.create_task(self._refresh())
        if len(self._pending) >= MAX_PENDING or self.stream_exists is False:
            await self.nc.publish(subject, data, headers=headers)
            return
        task = asyncio.create_task(self._deliver(subject, data, headers))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _deliver(self, subject: str, data: bytes, headers: dict[str, str]) -> None:
        deadline = asyncio.get_running_loop().time() + RETRY_FOR_S
        while True:
            try:
                await self.js.publish(subject, data, timeout=2.0, headers=headers)
                return
            except nats.errors.NoRespondersError:  # no stream captures completions here
                if self.nc.is_connected:
                    await self.nc.publish(subject, data, headers=headers)
                    return
            except (TimeoutError, nats.errors.Error, nats.js.errors.Error) as exc:
                if asyncio.get_running_loop().time() >= deadline or self.nc.is_closed:
                    self._throttle.log(self.log, "completed event given up", error=str(exc) or type(exc).__name__)
                    return
                if isinstance(exc, TimeoutError | nats.errors.TimeoutError) and not await self._check_stream():
                    return  # no stream: the publish reached the plain subscribers as a message
            await asyncio.sleep(0.25)

    async def _refresh(self) -> None:
        try:
            await self._check_stream()
        finally:
            self._checking = None

    async def _check_stream(self) -> bool:
        """Look the stream up; on no answer, keep what was known. False only when it is known absent."""
        try:
            await self.js.stream_info(self.stream)
            self.stream_exists = True
        except (nats.js.errors.NotFoundError, nats.errors.NoRespondersError):
            self.stream_exists = False  # no such stream, or no JetStream at all
        except (TimeoutError, nats.errors.Error, nats.js.errors.Error):
            pass
        return self.stream_exists is not False

    async def drain(self, timeout_s: float = 10.0) -> None:
        """Wait for events still being delivered (at shutdown, before the connection drains)."""
        if self._pending:
            await asyncio.wait(list(self._pending), timeout=timeout_s)

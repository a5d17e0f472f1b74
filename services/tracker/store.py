"""The process table's persistence: one JetStream key-value entry per program.

A restarted tracker reads every entry back, so programs keep their attained service across restarts.
Writes are batched: a program changed by an event is marked dirty and written within
``flush_interval_s`` (and at shutdown), so a tracker killed outright loses at most that window.
Keys name the program ids through :func:`autellix.proto.limits.storage_key` (base64url, or a hash
for long ids: program ids may hold characters keys may not, and no id may make a key too long).
A write that fails leaves only its own program dirty, to retry at the next flush; it never holds
back the others.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js.kv import KeyValue

from autellix.proto.limits import storage_key
from autellix.services.log_throttle import LogThrottle
from autellix.services.logs import get_logger

from .kv_writer import KvWriter
from .process_table import ProcessTable, ProgramRecord, from_record, to_record

#: writes of one record that may fail in a row before it waits for the program's next change
MAX_WRITE_FAILURES = 5
#: records written at once (their acknowledgements awaited together, WRITE_TIMEOUT_S at most)
WRITE_WINDOW = 256
WRITE_TIMEOUT_S = 10.0


def bucket_name(root: str) -> str:
    return "autellix_programs_" + "".join(c if c.isalnum() or c in "-_" else "_" for c in root)


def _key(program_id: str) -> str:
    return storage_key(program_id)


#: JetStream's "no suitable peers for placement": a cluster whose nodes have not all joined yet
_NO_PEERS = 10005


def jetstream_not_ready(exc: Exception) -> bool:
    """A JetStream error that goes away by itself (leaders being elected, peers joining)."""
    if isinstance(
        exc, nats.js.errors.ServiceUnavailableError | nats.errors.NoRespondersError | nats.errors.TimeoutError
    ):
        return True
    return isinstance(exc, nats.js.errors.APIError) and getattr(exc, "err_code", None) == _NO_PEERS


class ProgramStore:
    def __init__(
        self, table: ProcessTable, root: str, replicas: int = 1, owns: Callable[[str], bool] | None = None
    ) -> None:
        self.replicas = replicas
        #: which programs this tracker restores (a shard's own; all when None)
        self.owns = owns
        self.table = table
        self.bucket = bucket_name(root)
        self.log = get_logger("tracker")
        self._kv: KeyValue | None = None
        self._writer: KvWriter | None = None
        self._dirty: set[str] = set()
        self._deleted: set[str] = set()
        self._encoder = msgspec.json.Encoder()
        self._decoder = msgspec.json.Decoder(ProgramRecord)
        self._throttle = LogThrottle()
        #: program id -> writes of its record that failed in a row
        self._failures: dict[str, int] = {}
        #: program id -> acknowledgements of the events applied to it, sent once its record is written
        self._acks: dict[str, list[Callable[[], Awaitable[None]]]] = {}

    @property
    def enabled(self) -> bool:
        return self._kv is not None

    async def open(self, nc: NATS, wait_s: float = 15.0) -> int:
        """Bind (or create) the bucket and load every program; returns how many were restored.
        JetStream that is not ready yet (a cluster still electing its leaders, a node rejoining) is
        retried for ``wait_s``; a server without JetStream keeps the table in memory only (logged)."""
        js = nc.jetstream()
        deadline = asyncio.get_running_loop().time() + wait_s
        while True:
            try:
                try:
                    self._kv = await js.key_value(self.bucket)
                except nats.js.errors.BucketNotFoundError:
                    self._kv = await js.create_key_value(bucket=self.bucket, history=1, replicas=self.replicas)
                self._writer = KvWriter(nc, self.bucket)
                break
            except (nats.js.errors.Error, nats.errors.Error) as exc:
                if not jetstream_not_ready(exc):
                    self.log.warning("no JetStream: the process table is kept in memory only", error=str(exc))
                    self._kv = None
                    return 0
                if asyncio.get_running_loop().time() >= deadline:
                    self.log.warning("JetStream did not become ready: the process table is kept in memory only")
                    self._kv = None
                    return 0
                await asyncio.sleep(0.25)
        restored = 0
        watcher = await self._kv.watchall(ignore_deletes=True)
        try:
            async for entry in watcher:
                if entry is None:
                    break
                if not entry.value:
                    continue
                try:
                    record = self._decoder.decode(entry.value)
                    if self.owns is not None and not self.owns(record.program_id):
                        continue  # another shard's
                    self.table.restore(from_record(record, time.time()))
                    restored += 1
                except msgspec.MsgspecError as exc:
                    self.log.warning("unreadable program record skipped", key=entry.key, error=str(exc))
        finally:
            await watcher.stop()
        return restored

    def hold_ack(self, program_id: str, ack: Callable[[], Awaitable[None]]) -> None:
        """Acknowledge an event applied to ``program_id`` once the program's record is written (at
        once when nothing is persisted)."""
        self._acks.setdefault(program_id, []).append(ack)
        self._dirty.add(program_id)

    async def _release(self, program_id: str) -> None:
        for ack in self._acks.pop(program_id, ()):
            await ack()

    def mark(self, program_id: str) -> None:
        self._deleted.discard(program_id)
        self._dirty.add(program_id)

    def mark_deleted(self, program_id: str) -> None:
        self._dirty.discard(program_id)
        self._deleted.add(program_id)

    async def _write(self, window: list[str]) -> None:
        """Write these programs' records together. A record the bucket refused is logged and retried
        at the next flush, up to MAX_WRITE_FAILURES times; a connection error (no answer) is raised
        after every record of the window has been tried."""
        assert self._kv is not None and self._writer is not None
        items: list[tuple[str, bytes]] = []
        written: list[str] = []
        for program_id in window:
            entry = self.table.get(program_id)
            if entry is None:  # ended or forgotten: nothing of it to write
                await self._release(program_id)
                continue
            items.append((_key(program_id), self._encoder.encode(to_record(entry))))
            written.append(program_id)
        outcomes = await self._writer.put_many(items, timeout_s=WRITE_TIMEOUT_S)
        transient: list[Exception] = []
        for program_id, exc in zip(written, outcomes, strict=True):
            if exc is None:
                self._failures.pop(program_id, None)
                await self._release(program_id)
            elif not _lasting(exc):
                self._dirty.add(program_id)  # written next time
                transient.append(exc)
            else:
                failures = self._failures[program_id] = self._failures.get(program_id, 0) + 1
                if failures < MAX_WRITE_FAILURES:
                    self._dirty.add(program_id)  # only this program waits for the next flush
                else:
                    del self._failures[program_id]  # written again at its next change
                    await self._release(program_id)  # redelivering its events cannot help
                self._throttle.log(
                    self.log,
                    "program record not written",
                    program_id=program_id[:80],
                    failures=failures,
                    error=str(exc)[:200],
                )
        if transient:
            raise transient[0]

    async def flush(self) -> None:
        if self._kv is None:
            self._dirty.clear()
            self._deleted.clear()
            for program_id in list(self._acks):
                await self._release(program_id)
            return
        dirty, self._dirty = self._dirty, set()
        deleted, self._deleted = self._deleted, set()
        pending = list(dirty)
        # records are written WRITE_WINDOW at a time, their acknowledgements awaited together: one
        # round trip per window, not per record (a tracker holding thousands of changed programs a
        # second would otherwise spend its time waiting on the broker, one put after another)
        try:
            while pending:
                await self._write(pending[:WRITE_WINDOW])
                del pending[:WRITE_WINDOW]
        except BaseException:
            self._dirty.update(pending)  # written next time (a record of the window written already: again)
            self._deleted.update(deleted)
            raise
        for program_id in deleted:
            try:
                await self._kv.purge(_key(program_id))
            except nats.js.errors.Error as exc:
                self._throttle.log(
                    self.log, "could not delete program record", program_id=program_id[:80], error=str(exc)[:200]
                )


def _lasting(exc: Exception) -> bool:
    """A write error tied to this record (too large, refused), not to the connection: the other
    records can still be written."""
    return not isinstance(exc, nats.errors.ConnectionClosedError | nats.errors.TimeoutError)

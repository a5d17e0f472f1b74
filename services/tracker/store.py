"""The process table's persistence: one JetStream key-value entry per program.

A restarted tracker reads every entry back, so programs keep their attained service across restarts.
Writes are batched: a program changed by an event is marked dirty and written within
``flush_interval_s`` (and at shutdown), so a tracker killed outright loses at most that window.
Keys are the program ids, base64url-encoded (program ids may hold characters keys may not).
"""

from __future__ import annotations

import base64

import msgspec
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js.kv import KeyValue

from autellix.services.logs import get_logger

from .process_table import ProcessTable, ProgramRecord, from_record, to_record


def bucket_name(root: str) -> str:
    return "autellix_programs_" + "".join(c if c.isalnum() or c in "-_" else "_" for c in root)


def _key(program_id: str) -> str:
    return base64.urlsafe_b64encode(program_id.encode()).decode().rstrip("=") or "_"


class ProgramStore:
    def __init__(self, table: ProcessTable, root: str) -> None:
        self.table = table
        self.bucket = bucket_name(root)
        self.log = get_logger("tracker")
        self._kv: KeyValue | None = None
        self._dirty: set[str] = set()
        self._deleted: set[str] = set()
        self._encoder = msgspec.json.Encoder()
        self._decoder = msgspec.json.Decoder(ProgramRecord)

    @property
    def enabled(self) -> bool:
        return self._kv is not None

    async def open(self, nc: NATS) -> int:
        """Bind (or create) the bucket and load every program; returns how many were restored.
        Without JetStream on the server the table stays in memory only (logged)."""
        js = nc.jetstream()
        try:
            try:
                self._kv = await js.key_value(self.bucket)
            except nats.js.errors.BucketNotFoundError:
                self._kv = await js.create_key_value(bucket=self.bucket, history=1)
        except (nats.js.errors.Error, nats.errors.Error) as exc:
            self.log.warning("no JetStream: the process table is kept in memory only", error=str(exc))
            self._kv = None
            return 0
        restored = 0
        watcher = await self._kv.watchall(ignore_deletes=True)
        try:
            async for entry in watcher:
                if entry is None:
                    break
                if not entry.value:
                    continue
                try:
                    self.table.restore(from_record(self._decoder.decode(entry.value)))
                    restored += 1
                except msgspec.MsgspecError as exc:
                    self.log.warning("unreadable program record skipped", key=entry.key, error=str(exc))
        finally:
            await watcher.stop()
        return restored

    def mark(self, program_id: str) -> None:
        self._deleted.discard(program_id)
        self._dirty.add(program_id)

    def mark_deleted(self, program_id: str) -> None:
        self._dirty.discard(program_id)
        self._deleted.add(program_id)

    async def flush(self) -> None:
        if self._kv is None:
            self._dirty.clear()
            self._deleted.clear()
            return
        dirty, self._dirty = self._dirty, set()
        deleted, self._deleted = self._deleted, set()
        pending = list(dirty)
        try:
            while pending:
                entry = self.table.get(pending[-1])
                if entry is not None:
                    await self._kv.put(_key(pending[-1]), self._encoder.encode(to_record(entry)))
                pending.pop()
        except BaseException:
            self._dirty.update(pending)  # written next time
            self._deleted.update(deleted)
            raise
        for program_id in deleted:
            try:
                await self._kv.purge(_key(program_id))
            except nats.js.errors.Error as exc:
                self.log.warning("could not delete program record", program_id=program_id, error=str(exc))

"""The Python client: an agent program in a few lines.

    async with await Client.connect("nats://127.0.0.1:4222") as client:
        async with client.program() as p:
            plan = await p.call("Plan a trip to Paris in three steps.", max_tokens=64)
            a, b = await asyncio.gather(
                p.call(f"Expand step 1 of: {plan.text}", parents=[plan.call_id]),
                p.call(f"Expand step 2 of: {plan.text}", parents=[plan.call_id]),
            )
            async for text in p.stream("Summarise.", parents=[a.call_id, b.call_id]):
                print(text, end="")

A program id is made for you (or pass your own); leaving the ``async with`` ends the program at the
tracker. Calls in one program may run in parallel; ``parents`` names the calls a call depends on.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any

import msgspec
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from autellix.proto import (
    DEFAULT_ROOT,
    CallAbort,
    CallAccepted,
    CallChunk,
    CallError,
    CallFinal,
    CallReply,
    CallRequest,
    CallRetry,
    Message,
    ProgramEnd,
    ProgramEndReply,
    ProgramTable,
    Subjects,
    decode,
    decode_reply,
    encode,
)

from .auth import INBOX_ROOT, url_user
from .nats_config import NatsConfig
from .nats_conn import connect
from .settings import parse_url_list

MessagesLike = str | Sequence[dict[str, str]] | Sequence[Message]


def _user_of(nc: NATS) -> str:
    """The user a connection authenticated as, from the inbox prefix its identity is granted
    (``_I.<user>``, :mod:`autellix.services.auth`); "" for nats-py's default prefix."""
    prefix = bytes(getattr(nc, "_inbox_prefix", b"")).decode()
    return prefix[len(INBOX_ROOT) + 1 :] if prefix.startswith(INBOX_ROOT + ".") else ""


class CallFailed(Exception):
    """A call ended with an error message from the mesh (or no answer in time)."""

    def __init__(self, call_id: str, code: str, message: str) -> None:
        super().__init__(f"call {call_id} failed ({code}): {message}")
        self.call_id = call_id
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class CallResult:
    call_id: str
    text: str
    finish_reason: str
    prompt_tokens: int
    output_tokens: int
    engine_id: str
    #: measured by the client, from submission
    ttft_s: float
    latency_s: float
    final: CallFinal


def _messages(messages: MessagesLike | None) -> list[Message]:
    if messages is None:
        return []
    if isinstance(messages, str):
        return [Message(role="user", content=messages)]
    return [m if isinstance(m, Message) else Message(role=m["role"], content=m["content"]) for m in messages]


class _Reconnected:
    """Queued in every open call's mailbox when the connection came back after a disconnect."""


RECONNECTED = _Reconnected()


class _Mailbox:
    """A call's reply inbox: the subscription's callback queues each payload and wakes the reader.

    Cheaper per message than ``Subscription.next_msg`` (which makes a task, a uuid and a
    ``wait_for`` for every message): this sits on the path of every token chunk."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: deque[bytes | _Reconnected] = deque()
        self._waiter: asyncio.Future[None] | None = None

    async def put(self, msg: Msg) -> None:
        self._push(msg.data)

    def reconnected(self) -> None:
        """Tell the reader, in order after what arrived before, that replies may have been lost."""
        self._push(RECONNECTED)

    def _push(self, item: bytes | _Reconnected) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self, wait_s: float) -> bytes | _Reconnected | None:
        """The next payload, or None when none arrives within ``wait_s`` seconds."""
        if not self._items:
            loop = asyncio.get_running_loop()
            waiter = self._waiter = loop.create_future()
            timer = loop.call_later(wait_s, lambda: waiter.done() or waiter.set_result(None))
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
            if not self._items:
                return None
        return self._items.popleft()


class CallStream:
    """An async iterator over a call's text as it is generated; ``result`` once it ends.

    Fault handling is the client's side of the contract: the request asks for an ``accepted``
    reply and is resubmitted (same call id, next attempt) when none comes within ``ack_timeout_s``
    (the scheduler that took it died, or the call was lost on its way to an engine; the wait doubles
    with each such resubmission, so a merely slow mesh is not flooded); on a ``retry`` reply (its
    engine died) it is resubmitted with the token ids received so far, and the new engine continues
    after them. Replies of older
    attempts are ignored, so the caller sees one stream with no token missing or repeated.

    Core NATS delivers at most once, so replies can be lost when the broker restarts (sent while
    this client was not yet subscribed again). Each chunk says where its tokens start: a repeat is
    dropped, and a gap, a final that counts more tokens than arrived, or a reconnect of this
    client's connection (anything may have been lost meanwhile) resubmits the call after the tokens
    received. Those resubmissions do not count against ``max_attempts``, which bounds failures.
    """

    def __init__(self, client: Client, request: CallRequest, timeout_s: float) -> None:
        self._client = client
        self.request = request
        self.call_id = request.call_id
        self._timeout_s = timeout_s
        self._sub: Subscription | None = None
        self._mailbox = _Mailbox()
        self._inbox = ""
        self._started = 0.0
        self._first_at: float | None = None
        self._accepted = False
        self._submitted_at = 0.0
        self.attempt = 0
        #: the engine running the current attempt, as its replies say ("" before any)
        self._engine_id = ""
        #: resubmissions after a failure (no engine took the call, its engine died)
        self._failures = 0
        #: of those, resubmissions because no "accepted" came in time
        self._unacked = 0
        self.token_ids: list[int] = []
        self.result: CallResult | None = None

    async def _open(self) -> None:
        nc = self._client.nc
        self._inbox = nc.new_inbox()
        self._sub = await nc.subscribe(self._inbox, cb=self._mailbox.put)
        self._client.open_calls.add(self._mailbox)
        self._started = time.perf_counter()
        await self._submit()

    async def _submit(self, prefer_engine: str = "") -> None:
        request = msgspec.structs.replace(
            self.request,
            reply_to=self._inbox,
            submitted_at=time.time(),
            attempt=self.attempt,
            resume_token_ids=list(self.token_ids),
            ack=True,
            prefer_engine=prefer_engine,
        )
        self._accepted = False
        self._submitted_at = time.perf_counter()
        await self._client.nc.publish(self._client.submit_subject, encode(request))

    async def _resubmit(self, why: str, failure: bool = True) -> None:
        """Submit the next attempt, after the tokens received. ``failure``: a scheduler or engine
        failed (bounded by ``max_attempts``); else replies were lost in transit, and the engine that
        ran the call is asked for again (it carries on where it is, nothing recomputed)."""
        prefer, self._engine_id = ("" if failure else self._engine_id), ""
        if failure:
            if self._failures >= self._client.max_attempts - 1:
                await self.aclose()
                raise CallFailed(
                    self.call_id, "retries_exhausted", f"gave up after {self._failures + 1} attempts: {why}"
                )
            self._failures += 1
        self.attempt += 1
        await self._submit(prefer)

    def _lost_tokens(self, reply: CallChunk | CallFinal) -> bool:
        """Whether tokens of this call went missing before ``reply`` (a repeat is not a loss)."""
        have = len(self.token_ids)
        if isinstance(reply, CallChunk):
            start, end = reply.offset, reply.offset + len(reply.token_ids)
            return start > have or (0 <= start < have < end)  # a gap, or a partial repeat
        # every token of a streamed call comes in a chunk before its final
        return self.request.stream and reply.output_tokens > have

    def __aiter__(self) -> AsyncIterator[str]:
        return self

    async def _next_reply(self) -> CallReply | None:
        """The next reply of the current attempt; None when a resubmission happened instead."""
        assert self._sub is not None
        ack_wait = self._client.ack_timeout_s * 2 ** min(self._unacked, 6)
        ack_left = ack_wait - (time.perf_counter() - self._submitted_at)
        wait = self._timeout_s if self._accepted else max(0.01, min(self._timeout_s, ack_left))
        data = await self._mailbox.get(wait)
        if isinstance(data, _Reconnected):
            await self._resubmit("the connection to the broker was re-established", failure=False)
            return None
        if data is None:
            if not self._accepted:
                self._unacked += 1
                await self._resubmit("no engine accepted the call")
                return None
            await self.aclose()
            raise CallFailed(self.call_id, "timeout", f"no answer within {self._timeout_s:g} s")
        reply = decode_reply(data)
        if reply.attempt < self.attempt:
            return None  # a straggler of an attempt we gave up on
        if reply.attempt > self.attempt:
            self.attempt = reply.attempt  # an engine handed the call to another one
        return reply

    async def __anext__(self) -> str:
        if self.result is not None:
            raise StopAsyncIteration
        if self._sub is None:
            await self._open()
        while True:
            reply = await self._next_reply()
            if reply is None:
                continue
            if isinstance(reply, CallAccepted):
                self._accepted = True
                self._engine_id = reply.engine_id or self._engine_id
                continue
            self._accepted = True  # any reply of this attempt shows that it was taken
            if isinstance(reply, CallChunk | CallFinal) and reply.engine_id:
                self._engine_id = reply.engine_id
            if isinstance(reply, CallRetry):
                await self._resubmit(reply.reason)
                continue
            if isinstance(reply, CallChunk | CallFinal) and self._lost_tokens(reply):
                await self._resubmit(f"tokens after the first {len(self.token_ids)} were lost", failure=False)
                continue
            if isinstance(reply, CallChunk):
                if 0 <= reply.offset < len(self.token_ids):
                    continue  # a repeat of tokens already received
                if self._first_at is None:
                    self._first_at = time.perf_counter()
                self.token_ids.extend(reply.token_ids)
                if reply.text:
                    return reply.text
                continue
            await self._unsubscribe()
            if isinstance(reply, CallError):
                raise CallFailed(reply.call_id or self.call_id, reply.code, reply.message)
            assert isinstance(reply, CallFinal)
            now = time.perf_counter()
            first = self._first_at if self._first_at is not None else now
            self.result = CallResult(
                call_id=reply.call_id,
                text=reply.text,
                finish_reason=reply.finish_reason,
                prompt_tokens=reply.prompt_tokens,
                output_tokens=reply.output_tokens,
                engine_id=reply.engine_id,
                ttft_s=first - self._started,
                latency_s=now - self._started,
                final=reply,
            )
            raise StopAsyncIteration

    async def collect(self) -> CallResult:
        async for _ in self:
            pass
        assert self.result is not None
        return self.result

    async def _unsubscribe(self) -> None:
        assert self._sub is not None
        self._client.open_calls.discard(self._mailbox)
        sub, self._sub = self._sub, None
        await sub.unsubscribe()

    async def aclose(self) -> None:
        """Stop reading; if the call has not ended, ask the engines to abort it."""
        if self._sub is not None:
            await self._unsubscribe()
            if self.result is None and not self._client.nc.is_closed:
                await self._client.nc.publish(self._client.abort_subject, encode(CallAbort(call_id=self.call_id)))

    async def __aenter__(self) -> CallStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class Program:
    """One agent program: a session whose calls share a program id (and so a priority)."""

    def __init__(self, client: Client, program_id: str | None = None) -> None:
        self.client = client
        self.program_id = program_id or f"prog-{uuid.uuid4().hex}"

    def stream(
        self,
        messages: MessagesLike | None = None,
        *,
        prompt: str | None = None,
        max_tokens: int = 128,
        temperature: float = 0.0,
        seed: int | None = None,
        parents: Sequence[str] | None = None,
        call_id: str | None = None,
        ignore_eos: bool = False,
        timeout_s: float | None = None,
        deadline_s: float = 0.0,
    ) -> CallStream:
        request = CallRequest(
            program_id=self.program_id,
            call_id=call_id or f"call-{uuid.uuid4().hex}",
            messages=_messages(messages),
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=temperature,
            seed=seed,
            ignore_eos=ignore_eos,
            parents=list(parents) if parents is not None else None,
            deadline_s=deadline_s,
        )
        return CallStream(self.client, request, timeout_s or self.client.timeout_s)

    async def call(self, messages: MessagesLike | None = None, **kwargs: Any) -> CallResult:
        """Make a call and wait for its whole answer. Raises :class:`CallFailed` on an error."""
        async with self.stream(messages, **kwargs) as stream:
            return await stream.collect()

    async def end(self) -> ProgramEndReply:
        return await self.client.end_program(self.program_id)

    async def __aenter__(self) -> Program:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self.client.nc.is_closed:
            try:
                await self.end()
            except nats.errors.Error:
                pass  # no tracker to tell: it forgets the program after its idle TTL anyway


class Client:
    def __init__(
        self,
        nc: NATS,
        root: str = DEFAULT_ROOT,
        timeout_s: float = 300.0,
        owns_connection: bool = False,
        ack_timeout_s: float = 5.0,
        max_attempts: int = 5,
        user: str | None = None,
    ):
        self.nc = nc
        self.subjects = Subjects(root)
        #: the authenticated user this connection is (None without auth): submissions, aborts and
        #: program ends go to that user's own subjects, the only ones the broker lets it use
        self.user = user if user is not None else _user_of(nc)
        s = self.subjects
        u = self.user
        self.submit_subject = s.call_submit_as(u) if u else s.call_submit
        self.abort_subject = s.call_abort_as(u) if u else s.call_abort
        self.end_subject = s.program_end_as(u) if u else s.program_end
        #: longest wait for the next message of a call
        self.timeout_s = timeout_s
        #: how long a submission may go unacknowledged before it is resubmitted
        self.ack_timeout_s = ack_timeout_s
        self.max_attempts = max_attempts
        self._owns = owns_connection
        #: the mailboxes of calls being read: each is told when the connection comes back
        self.open_calls: set[_Mailbox] = set()
        self._chain_reconnected_cb(nc)

    def _chain_reconnected_cb(self, nc: NATS) -> None:
        """Tell the open calls when ``nc`` reconnects, before the callback it had (if any) runs.
        nats-py takes one callback at connect time; this client may get a connection made elsewhere
        (the gateway's), so the callback is chained on the connection itself."""
        previous = getattr(nc, "_reconnected_cb", None)

        async def reconnected() -> None:
            for mailbox in list(self.open_calls):
                mailbox.reconnected()
            if previous is not None:
                await previous()

        nc._reconnected_cb = reconnected  # pyright: ignore[reportAttributeAccessIssue]

    @classmethod
    async def connect(
        cls,
        url: str | None = None,
        root: str | None = None,
        timeout_s: float = 300.0,
        ack_timeout_s: float = 5.0,
        max_attempts: int = 5,
        nats: NatsConfig | None = None,
    ) -> Client:
        """Connect to the mesh at ``url`` (a comma list for a cluster) under ``root``, or as ``nats``
        says (servers or credentials file, root, TLS). With neither: the environment, as every
        service reads it (:class:`autellix.services.nats_config.NatsConfig`: ``AUTELLIX_NATS_CREDS``,
        else ``AUTELLIX_NATS``, else the credentials ``autellix up`` wrote on this machine, else the
        open default nats://127.0.0.1:4222; ``AUTELLIX_ROOT``)."""
        config = nats or NatsConfig.from_env()
        if url:
            config = replace(config, urls=parse_url_list(url), creds=None)
        if root is not None:
            config = replace(config, root=root)
        server_url = config.server_url(client=True)
        nc = await connect(config, "autellix-client", fail_fast=True, client=True)
        return cls(
            nc,
            user=url_user(server_url) or "",
            root=config.root,
            timeout_s=timeout_s,
            owns_connection=True,
            ack_timeout_s=ack_timeout_s,
            max_attempts=max_attempts,
        )

    def program(self, program_id: str | None = None) -> Program:
        return Program(self, program_id)

    async def end_program(self, program_id: str, timeout_s: float = 5.0) -> ProgramEndReply:
        """Tell the tracker the program is over; returns its reply (``ok`` and the program's final
        row, or ``code`` and ``error`` when the tracker does not know it)."""
        msg = await self.nc.request(self.end_subject, encode(ProgramEnd(program_id=program_id)), timeout_s)
        return decode(msg.data, ProgramEndReply)

    async def table(self, timeout_s: float = 5.0) -> ProgramTable:
        """The process table; with sharded trackers, every shard's programs (a shard answers with its
        own and says how many shards there are: then every shard is asked, and awaited up to
        ``timeout_s``)."""
        first = decode((await self.nc.request(self.subjects.tracker_table, b"{}", timeout_s)).data, ProgramTable)
        if first.shards <= 1:
            return first
        tables: dict[int, ProgramTable] = {}
        answered = asyncio.Event()

        async def on_reply(msg: Msg) -> None:
            table = decode(msg.data, ProgramTable)
            tables[table.shard] = table
            if len(tables) >= table.shards:
                answered.set()

        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox, cb=on_reply)
        try:
            await self.nc.publish(self.subjects.tracker_table, b"{}", reply=inbox)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(answered.wait(), timeout_s)
        finally:
            await sub.unsubscribe()
        programs = [row for shard in sorted(tables) for row in tables[shard].programs]
        return ProgramTable(programs=programs, shard=0, shards=first.shards)

    async def close(self) -> None:
        """Drain and close the connection this client opened. With the broker gone (a connection
        reconnecting, or lost while draining) there is nothing to drain: it just closes."""
        if not self._owns or self.nc.is_closed:
            return
        if self.nc.is_connected:
            try:
                await self.nc.drain()
                return
            except nats.errors.Error:  # the broker went away while draining
                pass
        await self.nc.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

"""`autellix demo`: a small agent program — dependent calls, then a fan-out of parallel calls."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable

from .client import CallResult, Client

Print = Callable[[str], None]


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _stats(r: CallResult) -> str:
    return f"    ({r.output_tokens} tokens, ttft {r.ttft_s * 1000:.0f} ms, {r.latency_s:.2f} s, engine {r.engine_id})"


async def run_demo(client: Client, out: Print = print, write: Print = _write, max_tokens: int = 48) -> float:
    """Run the demo program; returns its latency in seconds."""
    started = time.perf_counter()
    async with client.program() as p:
        out(f"program {p.program_id}")

        def show(step: str, r: CallResult) -> None:
            out(f"[{step}] {' '.join(r.text.split())}")
            out(_stats(r))

        first = await p.call("What is the capital of France? Answer in one sentence.", max_tokens=max_tokens)
        show("1 question", first)
        second = await p.call(
            [
                {"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": first.text},
                {"role": "user", "content": "Name one famous landmark in that city."},
            ],
            max_tokens=max_tokens,
            parents=[first.call_id],
        )
        show("2 follow-up", second)
        topics = ["its history", "its food", "its museums"]
        fan = await asyncio.gather(
            *(
                p.call(
                    f"Tell me one short fact about Paris and {topic}.", max_tokens=max_tokens, parents=[second.call_id]
                )
                for topic in topics
            )
        )
        for topic, r in zip(topics, fan, strict=True):
            show(f"3 fan-out: {topic}", r)
        summary = p.stream(
            "Summarise in one sentence: " + " ".join(r.text for r in fan),
            max_tokens=max_tokens,
            parents=[r.call_id for r in fan],
        )
        write("[4 summary, streamed]")
        async for text in summary:
            write(text)
        write("\n")
        assert summary.result is not None
        out(_stats(summary.result))
    latency = time.perf_counter() - started
    out(f"program latency {latency:.2f} s over 6 calls")
    return latency

"""The ``hf`` prefix cache on a multi-turn chat: hit rate and time to first token, with and without.

One chat program of ``--turns`` turns (turn k+1 re-sends turn k's whole history with the reply
appended) runs through the engine core (:class:`engine.core.EngineCore`, as the engine service
drives it) on two forks of one loaded SmolLM2-135M: one with the prefix cache, one without. The
two are interleaved turn by turn (cached first on even rounds, uncached first on odd ones), so
both see the same machine load; greedy decoding makes both conversations identical, which the
script checks.

Per turn: prompt tokens, tokens served from the cache, time to first token (wall clock from
``add`` to the first sampled token) with and without the cache. Then decode throughput of the
cached and the uncached backend on the same batch of prompts, interleaved, to show the cache
costs the decode loop nothing.

    python bench/hf_prefix_cache.py [--turns 8] [--reply-tokens 48] [--rounds 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from autellix.engine.core import CoreCall, CoreConfig, EngineCore, FinishEvent, TokenEvent, execute_plan
from autellix.engine.hf_backend import HFBackend
from autellix.engine.model_store import resolve_model

SYSTEM = "You are a helpful travel assistant. Answer in a few sentences."
QUESTIONS = [
    "I want to visit Italy in spring. Where should I start?",
    "How many days should I spend in Rome?",
    "What should I eat there?",
    "Is it easy to take the train to Florence?",
    "What are the best museums in Florence?",
    "Should I rent a car in Tuscany?",
    "Which small towns are worth a day trip?",
    "How do I get from Tuscany to Venice?",
    "What is the best way to see Venice in one day?",
    "Any tips for flying home from Venice?",
]


def one_call(backend: HFBackend, call_id: str, program: str, prompt: list[int], max_tokens: int) -> dict[str, Any]:
    """Run one call alone through the engine core; its tokens, TTFT and the prompt tokens it hit."""
    core = EngineCore(backend, CoreConfig(max_batch=8))
    before = backend.cache_stats().hit_tokens
    started = time.perf_counter()
    core.add(CoreCall(call_id, program, prompt, max_tokens, ignore_eos=True), 0.0)
    ttft: float | None = None
    out: list[int] = []
    while not core.idle:
        plan = core.schedule(time.perf_counter() - started)
        assert plan is not None
        result = execute_plan(backend, plan)
        for e in core.update(plan, result, time.perf_counter() - started):
            if isinstance(e, TokenEvent) and ttft is None:
                ttft = time.perf_counter() - started
            elif isinstance(e, FinishEvent):
                out = list(e.state.output_ids)
    return {"tokens": out, "ttft_s": ttft, "hit_tokens": backend.cache_stats().hit_tokens - before}


def chat_round(cached: HFBackend, plain: HFBackend, turns: int, reply_tokens: int, r: int) -> list[dict[str, Any]]:
    histories = {"cached": [{"role": "system", "content": SYSTEM}], "plain": [{"role": "system", "content": SYSTEM}]}
    backends = {"cached": cached, "plain": plain}
    rows = []
    for t in range(turns):
        row: dict[str, Any] = {"turn": t + 1}
        order = ["cached", "plain"] if (r + t) % 2 == 0 else ["plain", "cached"]
        for name in order:
            be, msgs = backends[name], histories[name]
            msgs.append({"role": "user", "content": QUESTIONS[t % len(QUESTIONS)]})
            prompt = be.encode_chat(msgs)
            res = one_call(be, f"r{r}-t{t}", f"chat{r}", prompt, reply_tokens)
            msgs.append({"role": "assistant", "content": be.decode(res["tokens"])})
            row["prompt_tokens"] = len(prompt)
            row[f"{name}_ttft_s"] = res["ttft_s"]
            row[f"{name}_hit_tokens"] = res["hit_tokens"]
            row[f"{name}_tokens"] = res["tokens"]
        row["same_tokens"] = row.pop("cached_tokens") == row.pop("plain_tokens")
        rows.append(row)
    return rows


def decode_throughput(backends: dict[str, HFBackend], batch: int, new_tokens: int, rounds: int) -> dict[str, float]:
    """Decode tok/s of a batch through the engine core, backends interleaved; best of ``rounds``."""
    best: dict[str, float] = {}
    for r in range(rounds):
        for name, be in sorted(backends.items(), reverse=r % 2 == 1):  # alternate who goes first
            prompts = [
                be.encode_chat([{"role": "user", "content": f"Tell me fact number {i + 100 * r} about {name}."}])
                for i in range(batch)
            ]
            core = EngineCore(be, CoreConfig(max_batch=batch, max_batched_tokens=8192))
            for i, p in enumerate(prompts):
                core.add(CoreCall(f"d{r}-{i}", f"d{r}-{i}", p, new_tokens, ignore_eos=True), 0.0)
            decode_s, decoded = 0.0, 0
            while not core.idle:
                plan = core.schedule(0.0)
                assert plan is not None
                result = execute_plan(be, plan)
                if result.output.extra.get("prefill_tokens", 0.0) == 0.0:
                    decode_s += result.output.elapsed_s
                    decoded += len(result.output.next_tokens)
                core.update(plan, result, 0.0)
            best[name] = max(best.get(name, 0.0), decoded / decode_s)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--reply-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--decode-batch", type=int, default=16)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    base = HFBackend(resolve_model(None), max_batch=32, kv_capacity_tokens=16_384, threads=args.threads)
    rounds = []
    for r in range(args.rounds):
        cached = base.fork(prefix_cache=True, cpu_tier_tokens=8192)
        plain = base.fork(prefix_cache=False)
        rows = chat_round(cached, plain, args.turns, args.reply_tokens, r)
        stats = cached.cache_stats()
        rounds.append({"turns": rows, "hit_rate": stats.hit_rate, "hit_tokens": stats.hit_tokens})
        for row in rows:
            print(
                f"round {r} turn {row['turn']}: prompt {row['prompt_tokens']:4d} tok, "
                f"hit {row['cached_hit_tokens']:4d}, "
                f"TTFT cached {row['cached_ttft_s'] * 1e3:7.1f} ms, uncached {row['plain_ttft_s'] * 1e3:7.1f} ms, "
                f"same tokens {row['same_tokens']}"
            )
        hits = f"{stats.hit_tokens} of {stats.prompt_tokens} tokens"
        print(f"round {r}: prefix-cache hit rate {stats.hit_rate:.1%} ({hits})")
    last = [rd["turns"][-1] for rd in rounds]
    summary = {
        "turn": args.turns,
        "ttft_cached_s_median": statistics.median(x["cached_ttft_s"] for x in last),
        "ttft_uncached_s_median": statistics.median(x["plain_ttft_s"] for x in last),
        "hit_rate_mean": statistics.mean(rd["hit_rate"] for rd in rounds),
        "all_same_tokens": all(row["same_tokens"] for rd in rounds for row in rd["turns"]),
    }
    summary["ttft_speedup"] = summary["ttft_uncached_s_median"] / summary["ttft_cached_s_median"]
    tput = decode_throughput(
        {"cached": base.fork(prefix_cache=True, cpu_tier_tokens=8192), "uncached": base.fork(prefix_cache=False)},
        args.decode_batch,
        args.decode_tokens,
        args.rounds,
    )
    summary["decode_tok_s"] = tput
    summary["decode_ratio_cached_to_uncached"] = tput["cached"] / tput["uncached"]
    print(json.dumps(summary, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rounds": rounds, "summary": summary}, f, indent=2)


if __name__ == "__main__":
    main()

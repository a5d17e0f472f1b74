"""The ``hf`` prefix cache on the real SmolLM2-135M: a cache hit never changes a token.

Each scenario runs twice on forks of one loaded model, with the cache and without it, through the
engine core (greedy, a few tokens per call), and the outputs must be equal while the cached run
really hit: a multi-turn chat re-sending its history, siblings sharing a parent's history, a hit
from the CPU tier, and the eviction order under a step that needs room.
"""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from autellix.engine.backend import PrefixCache, SeqWork, StepBatch
from autellix.engine.core import CoreCall, CoreConfig, EngineCore, FinishEvent, execute_plan

# the first test of a module loads (or converts) the model and makes references: slow on a loaded 2-core machine
pytestmark = [pytest.mark.model, pytest.mark.timeout(900)]

TOKENS = 6
SYSTEM = {"role": "system", "content": "You are a concise assistant. Answer in one short sentence."}


def serve(backend, specs: list[CoreCall]) -> dict[str, list[int]]:  # type: ignore[no-untyped-def]
    """Run calls that arrive together to completion; each call's generated tokens."""
    core = EngineCore(backend, CoreConfig(max_batch=8))
    for spec in specs:
        core.add(spec, 0.0)
    out: dict[str, list[int]] = {}
    now, steps = 0.0, 0
    while not core.idle:
        plan = core.schedule(now)
        assert plan is not None
        result = execute_plan(backend, plan)
        now += result.output.elapsed_s
        for e in core.update(plan, result, now):
            if isinstance(e, FinishEvent):
                out[e.call_id] = list(e.state.output_ids)
        steps += 1
        assert steps < 500
    return out


def chat(backend, program: str, questions: list[str]) -> list[list[int]]:  # type: ignore[no-untyped-def]
    """A conversation: turn k+1 re-sends turn k's history with the reply appended."""
    messages = [SYSTEM]
    replies = []
    for i, q in enumerate(questions):
        messages.append({"role": "user", "content": q})
        prompt = backend.encode_chat(messages)
        out = serve(backend, [CoreCall(f"{program}-{i}", program, prompt, TOKENS, ignore_eos=True)])[f"{program}-{i}"]
        replies.append(out)
        messages.append({"role": "assistant", "content": backend.decode(out)})
    return replies


@pytest.fixture
def pair(hf_backend):  # type: ignore[no-untyped-def]
    """A cached and an uncached backend over the same weights."""
    return hf_backend.fork(prefix_cache=True, cpu_tier_tokens=2048), hf_backend.fork(prefix_cache=False)


def test_multi_turn_chat_hits_and_generates_the_same_tokens(pair) -> None:  # type: ignore[no-untyped-def]
    cached, plain = pair
    assert isinstance(cached, PrefixCache)
    questions = ["Name a fruit.", "What colour is it?", "Where does it grow?"]
    assert chat(cached, "c", questions) == chat(plain, "c", questions)
    stats = cached.cache_stats()
    assert plain.cache_stats().hit_tokens == 0
    # turns 2 and 3 find all of the previous turn's context but the re-tokenised reply tail
    assert stats.hit_tokens > 0.5 * (
        stats.prompt_tokens - len(cached.encode_chat([SYSTEM, {"role": "user", "content": questions[0]}]))
    )
    assert stats.retained_tokens > 0 and cached.kv_tokens_used() == 0


def test_siblings_share_the_parent_history(pair) -> None:  # type: ignore[no-untyped-def]
    results = []
    for backend in pair:
        parent_msgs = [SYSTEM, {"role": "user", "content": "Suggest a name for a cat."}]
        parent = serve(backend, [CoreCall("parent", "tree", backend.encode_chat(parent_msgs), TOKENS, ignore_eos=True)])
        history = [*parent_msgs, {"role": "assistant", "content": backend.decode(parent["parent"])}]
        children = [
            CoreCall(f"child{i}", "tree", backend.encode_chat([*history, {"role": "user", "content": q}]), TOKENS)
            for i, q in enumerate(["Another one?", "Why that name?", "Is it short?"])
        ]
        results.append((parent, serve(backend, children)))
    assert results[0] == results[1]
    cached = pair[0].cache_stats()
    parent_len = len(pair[0].encode_chat([SYSTEM, {"role": "user", "content": "Suggest a name for a cat."}]))
    assert cached.hit_tokens >= 3 * parent_len  # every child found at least the parent's prompt


def test_hit_from_the_cpu_tier_gives_the_same_tokens(hf_backend) -> None:  # type: ignore[no-untyped-def]
    other = hf_backend.encode_chat([{"role": "user", "content": "Describe the ocean in detail. " * 6}])
    budget = len(other) + TOKENS + 8  # the other program's call leaves no room for the chat's context
    cached = hf_backend.fork(prefix_cache=True, kv_capacity_tokens=budget, cpu_tier_tokens=2048)
    plain = hf_backend.fork(prefix_cache=False, kv_capacity_tokens=budget)
    outputs = []
    for backend in (cached, plain):
        first = chat(backend, "c", ["Name a fruit."])
        serve(backend, [CoreCall("other", "o", other, TOKENS, ignore_eos=True)])
        outputs.append((first, chat(backend, "c", ["Name a fruit.", "What colour is it?"])))
    assert outputs[0] == outputs[1]
    stats = cached.cache_stats()
    assert stats.tier_hit_tokens > 0 and stats.tiered_tokens >= 0


def test_eviction_order_contained_then_ended_then_lru(hf_backend) -> None:  # type: ignore[no-untyped-def]
    ids = hf_backend.encode_chat([{"role": "user", "content": "Count from one to twenty, slowly please."}])
    be = hf_backend.fork(prefix_cache=True, kv_capacity_tokens=4 * len(ids), cpu_tier_tokens=0)
    order = [("live", ids[:8] + [100] * 4, "p-live"), ("short", ids[:-6], "p-a"), ("long", ids, "p-a")]
    order.append(("ended", ids[:8] + [200] * 4, "p-ended"))
    for sid, toks, program in order:
        be.run(StepBatch([SeqWork(sid, toks, 0, sample=False, prefix_key=program)]))
        be.release(sid)
    be.end_prefix("p-ended")
    kept = lambda: sorted(len(e.tokens) for e in be.cache.entries.values())  # noqa: E731
    assert kept() == sorted([12, len(ids) - 6, len(ids), 12])
    # "short" goes first (contained by "long"), then the ended program's, then the live one
    for evicted, left in ((len(ids) - 6, [12, 12, len(ids)]), (12, [12, len(ids)]), (12, [len(ids)])):
        need = be.kv_tokens_capacity() - be.kv_tokens_retained() + evicted
        be.run(StepBatch([SeqWork("big", ids[:1] * need, 0, sample=False)]))
        be.drop("big")
        assert kept() == left
    assert be.cache_stats().evictions == 3

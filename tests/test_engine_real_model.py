"""The engine with the real SmolLM2-135M: exact resume across preemptions, and the whole mesh."""

from __future__ import annotations

import pytest
from meshkit import start_mesh, stop_mesh

from autellix.engine.core import CoreCall, CoreConfig, EngineCore, FinishEvent
from autellix.services.client import CallFailed

# the first test of a module loads (or converts) the model and makes references: slow on a loaded 2-core machine
pytestmark = [pytest.mark.model, pytest.mark.timeout(900)]

LONG_PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
TOKENS = 24


def run(core: EngineCore, arrivals: dict[int, list[CoreCall]] | None = None) -> dict[str, FinishEvent]:
    arrivals = arrivals or {}
    done: dict[str, FinishEvent] = {}
    step, now = 0, 0.0
    while not core.idle or any(k >= step for k in arrivals):
        for spec in arrivals.get(step, []):
            core.add(spec, now)
        outcome = core.step(now)
        if outcome is not None:
            now += outcome.result.output.elapsed_s
            done.update({e.call_id: e for e in outcome.events if isinstance(e, FinishEvent)})
        step += 1
        assert step < 2000
    return done


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_preempted_call_resumes_exactly(hf_backend, mode: str) -> None:  # type: ignore[no-untyped-def]
    prompt = hf_backend.encode_chat([{"role": "user", "content": LONG_PROMPT}])
    alone = run(
        EngineCore(hf_backend, CoreConfig(max_batch=1)), {0: [CoreCall("alone", "p", prompt, TOKENS, ignore_eos=True)]}
    )
    reference = alone["alone"].state.output_ids
    assert len(reference) == TOKENS

    core = EngineCore(hf_backend, CoreConfig(max_batch=1, schedule_every=1, preempt_mode=mode))  # type: ignore[arg-type]
    short = hf_backend.encode_chat([{"role": "user", "content": "Say hi."}])
    long_call = CoreCall("long", "slow", prompt, TOKENS, priority=30.0, program_service_s=30.0, ignore_eos=True)
    bursts = {
        3: [CoreCall("s0", "a", short, 3)],
        9: [CoreCall("s1", "b", short, 3)],
        15: [CoreCall("s2", "c", short, 3)],
    }
    done = run(core, {0: [long_call], **bursts})
    state = done["long"].state
    assert state.output_ids == reference
    assert state.preemptions >= 3
    if mode == "swap":
        assert state.swap_bytes > 0 and state.recomputed_tokens == 0
    else:
        assert state.recomputed_tokens > 0 and state.swap_bytes == 0
    assert hf_backend.kv_tokens_used() == 0 and hf_backend.swap_pool_bytes_used() == 0


async def test_a_real_answer_through_all_three_services(hf_backend, nats_url: str, root: str) -> None:  # type: ignore[no-untyped-def]
    mesh = await start_mesh(nats_url, root, backend_instance=hf_backend)
    try:
        async with mesh.client.program() as p:
            stream = p.stream("What is the capital of France?", max_tokens=24)
            text = "".join([piece async for piece in stream])
            assert stream.result is not None
            assert "Paris" in text and text == stream.result.text
            assert stream.result.finish_reason in ("stop", "length")
            # a prompt beyond the model's context gets a clear error; the engine keeps serving
            with pytest.raises(CallFailed) as info:
                await p.call("word " * 9000, max_tokens=8)
            assert info.value.code == "prompt_too_long" and "context" in info.value.message
            again = await p.call("What is the capital of France?", max_tokens=24)
            assert again.text == text
    finally:
        await stop_mesh(mesh)

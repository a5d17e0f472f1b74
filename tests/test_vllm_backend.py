"""The vllm backend's adapter logic, against a stand-in for vLLM's engine (vLLM itself needs a GPU
and is not installable on these machines), and against real vLLM where it is importable."""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from autellix.engine.core import CoreCall, CoreConfig, EngineCore, FinishEvent


@dataclass
class _Params:
    temperature: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    ignore_eos: bool = False
    output_kind: Any = None


@dataclass
class _Request:
    prompt: list[int]
    generated: list[int] = field(default_factory=list)


class FakeVLLMEngine:
    """vLLM's LLMEngine surface: each step adds one token to every request, a deterministic function
    of the whole sequence so far (so a resumed request continues exactly as greedy decoding would)."""

    def __init__(self) -> None:
        self.requests: dict[str, _Request] = {}
        self.steps = 0
        self.tokenizer = types.SimpleNamespace(
            eos_token_id=0,
            encode=lambda text, add_special_tokens=False: [ord(c) % 50 + 1 for c in text],
            decode=lambda ids, skip_special_tokens=True: "".join(chr(97 + i % 26) for i in ids),
            apply_chat_template=lambda msgs, add_generation_prompt, tokenize: [
                ord(c) % 50 + 1 for m in msgs for c in m["content"]
            ],
        )
        self.model_config = types.SimpleNamespace(max_model_len=4096)

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    def add_request(self, request_id: str, prompt: dict[str, list[int]], params: _Params) -> None:
        assert params.ignore_eos and request_id not in self.requests
        self.requests[request_id] = _Request(list(prompt["prompt_token_ids"]))

    def abort_request(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self.requests.pop(rid, None)

    def step(self) -> list[Any]:
        self.steps += 1
        outs = []
        for rid, r in self.requests.items():
            seq = r.prompt + r.generated
            token = (sum(seq) * 31 + len(seq)) % 97 + 3
            r.generated.append(token)
            outs.append(types.SimpleNamespace(request_id=rid, outputs=[types.SimpleNamespace(token_ids=[token])]))
        return outs


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    vllm = types.ModuleType("vllm")
    vllm.SamplingParams = _Params  # type: ignore[attr-defined]
    sampling = types.ModuleType("vllm.sampling_params")
    sampling.RequestOutputKind = types.SimpleNamespace(DELTA="delta")  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", sampling)
    yield


def run(core: EngineCore, arrivals: dict[int, list[CoreCall]]) -> dict[str, FinishEvent]:
    done: dict[str, FinishEvent] = {}
    step = 0
    while not core.idle or any(k >= step for k in arrivals):
        for spec in arrivals.get(step, []):
            core.add(spec, float(step))
        outcome = core.step(float(step))
        if outcome is not None:
            done.update({e.call_id: e for e in outcome.events if isinstance(e, FinishEvent)})
        step += 1
        assert step < 1000
    return done


def test_preempted_call_resumes_exactly_through_vllm(fake_vllm: None) -> None:
    from autellix.engine.vllm_backend import VLLMBackend

    backend = VLLMBackend("fake-model", engine=FakeVLLMEngine())
    prompt = backend.encode_prompt("a long prompt for a low priority call")
    alone = run(EngineCore(backend, CoreConfig(max_batch=1)), {0: [CoreCall("alone", "p", prompt, 30)]})
    reference = alone["alone"].state.output_ids

    engine = FakeVLLMEngine()
    backend = VLLMBackend("fake-model", engine=engine)
    core = EngineCore(backend, CoreConfig(max_batch=1, schedule_every=1, max_batched_tokens=8))
    low = CoreCall("low", "slow", prompt, 30, priority=9.0, program_service_s=9.0)
    short = backend.encode_prompt("hi")
    done = run(core, {0: [low], 5: [CoreCall("s0", "a", short, 3)], 12: [CoreCall("s1", "b", short, 3)]})
    state = done["low"].state
    assert state.output_ids == reference
    assert state.preemptions >= 2 and state.recomputed_tokens > 0 and state.swap_bytes == 0
    assert engine.requests == {}  # every request released or aborted
    assert backend.kv_tokens_used() == 0


def test_clear_error_without_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)
    from autellix.engine.vllm_backend import VLLMBackend, VLLMUnavailableError

    with pytest.raises(VLLMUnavailableError, match="needs vLLM and a GPU"):
        VLLMBackend("any")


def test_real_vllm_generates() -> None:
    pytest.importorskip("vllm", reason="vLLM is an optional extra that needs a CUDA GPU; not installed here")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("vLLM needs a CUDA GPU")
    from autellix.engine.model_store import resolve_model
    from autellix.engine.vllm_backend import VLLMBackend

    backend = VLLMBackend(str(resolve_model(None)), gpu_memory_utilization=0.3)
    prompt = backend.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    done = run(EngineCore(backend, CoreConfig(max_batch=4)), {0: [CoreCall("c", "p", prompt, 16)]})
    assert "Paris" in done["c"].text

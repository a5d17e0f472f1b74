"""The ``hf`` backend on the real SmolLM2-135M: exact against ``generate``, across swap and recompute.

A small driver below plays the engine core's part: sequences join at different steps, prompts are
prefilled in chunks, and sequences are swapped out and in, or dropped and recomputed, mid-decode.
Every greedy output must equal what Hugging Face ``generate(do_sample=False)`` gives for that prompt
alone.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from autellix.engine import model_store  # noqa: E402
from autellix.engine.backend import ModelBackend, SeqWork, StepBatch  # noqa: E402
from autellix.engine.hf_backend import HFBackend, SequenceStateError, SwapPoolFullError  # noqa: E402

# the first test of a module loads (or converts) the model and makes references: slow on a loaded 2-core machine
pytestmark = [pytest.mark.model, pytest.mark.timeout(900)]

NEW_TOKENS = 20
PROMPTS = {
    "france": "What is the capital of France?",
    "haiku": "Write a haiku about the sea.",
    "recursion": "Explain recursion to a child.",
    "primes": "List three prime numbers.",
    "hamlet": "Who wrote Hamlet?",
}
LONG_TEXT = (
    "The history of the printing press begins with movable type in East Asia and continues with "
    "Gutenberg's press in Mainz around 1440, which spread across Europe within decades. "
) * 9 + "Summarise this text in one sentence."


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return model_store.resolve_model(None)


@pytest.fixture(scope="session")
def backend(model_dir: Path) -> HFBackend:
    return HFBackend(model_dir, max_batch=16, kv_capacity_tokens=16_384, swap_pool_bytes=256 << 20)


@pytest.fixture(scope="session")
def prompt_ids(backend: HFBackend) -> dict[str, list[int]]:
    ids = {name: backend.encode_chat([{"role": "user", "content": text}]) for name, text in PROMPTS.items()}
    ids["long"] = backend.encode_chat([{"role": "user", "content": LONG_TEXT}])
    return ids


@pytest.fixture(scope="session")
def references(model_dir: Path, prompt_ids: dict[str, list[int]]) -> dict[str, list[int]]:
    """``generate(do_sample=False)`` for each prompt alone (stops after an end-of-sequence token)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    refs = {}
    with torch.inference_mode():
        for name, ids in prompt_ids.items():
            out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False)
            refs[name] = out[0, len(ids) :].tolist()
    return refs


@dataclass
class _Seq:
    prompt: list[int]
    out: list[int] = field(default_factory=list)
    kv_len: int = 0
    swapped: bool = False
    joined: bool = False

    @property
    def all_ids(self) -> list[int]:
        return self.prompt + self.out


def drive(
    backend: ModelBackend,
    prompts: dict[str, list[int]],
    *,
    joins: dict[str, int] | None = None,
    actions: dict[int, list[tuple[str, str]]] | None = None,
    prefill_chunk: int | None = None,
    new_tokens: int = NEW_TOKENS,
    temperature: float = 0.0,
    seed: int | None = None,
) -> dict[str, list[int]]:
    """Run ``prompts`` to ``new_tokens`` outputs each, the way the engine core would.

    ``joins[name]`` is the step at which a sequence arrives (default 0); ``actions[step]`` lists
    ``("swap_out"|"swap_in"|"drop", name)`` done before that step's ``run``.
    """
    joins = joins or {}
    actions = actions or {}
    seqs = {name: _Seq(list(ids)) for name, ids in prompts.items()}
    step = 0
    try:
        while any(len(s.out) < new_tokens for s in seqs.values()):
            for verb, name in actions.get(step, []):
                seq = seqs[name]
                if verb == "swap_out":
                    stats = backend.swap_out(name)
                    assert stats.bytes == seq.kv_len * backend.kv_bytes_per_token()
                    seq.swapped = True
                elif verb == "swap_in":
                    backend.swap_in(name)
                    seq.swapped = False
                elif verb == "drop":
                    backend.drop(name)
                    seq.kv_len, seq.swapped = 0, False
                else:
                    raise AssertionError(verb)
            work = []
            for name, seq in seqs.items():
                if joins.get(name, 0) > step or seq.swapped or len(seq.out) >= new_tokens:
                    continue
                pending = seq.all_ids[seq.kv_len :]
                sample = True
                if prefill_chunk is not None and len(pending) > prefill_chunk:
                    pending, sample = pending[:prefill_chunk], False
                work.append(SeqWork(name, pending, seq.kv_len, sample=sample, temperature=temperature, seed=seed))
            assert work or actions, "nothing to run"
            output = backend.run(StepBatch(work))
            for w in work:
                seq = seqs[w.seq_id]
                seq.kv_len += len(w.token_ids)
                if w.sample:
                    seq.out.append(output.next_tokens[w.seq_id])
                else:
                    assert w.seq_id not in output.next_tokens
            step += 1
            assert step < 500
    finally:
        for name in seqs:
            backend.release(name)
    return {name: s.out for name, s in seqs.items()}


def assert_matches(got: list[int], ref: list[int], eos: frozenset[int]) -> None:
    """``generate`` stops at end-of-sequence; the driver does not (it ignores EOS)."""
    assert got[: len(ref)] == ref
    if len(ref) < NEW_TOKENS:
        assert ref[-1] in eos


def test_backend_satisfies_protocol(backend: HFBackend) -> None:
    assert isinstance(backend, ModelBackend)
    assert backend.max_context == 8192
    assert backend.eos_token_ids == frozenset({2})
    assert backend.kv_bytes_per_token() == 30 * 2 * 3 * 64 * 4


def test_alone_matches_generate(backend: HFBackend, prompt_ids, references) -> None:
    for name in ("france", "haiku", "recursion", "long"):
        got = drive(backend, {name: prompt_ids[name]})[name]
        assert_matches(got, references[name], backend.eos_token_ids)
    assert backend.kv_tokens_used() == 0


def test_batched_with_staggered_joins_and_chunked_prefill(backend: HFBackend, prompt_ids, references) -> None:
    joins = {"france": 0, "haiku": 0, "recursion": 3, "primes": 5, "hamlet": 5, "long": 8}
    got = drive(backend, prompt_ids, joins=joins, prefill_chunk=64)
    for name, ref in references.items():
        assert_matches(got[name], ref, backend.eos_token_ids)
    assert backend.kv_tokens_used() == 0


def test_many_sequences_grow_the_slab(backend: HFBackend, prompt_ids, references) -> None:
    """More sequences than a new slab's initial slots: the slab doubles mid-run, outputs stay exact."""
    names = ("france", "haiku", "recursion", "primes", "hamlet")
    prompts = {f"{n}#{i}": prompt_ids[n] for i in range(2) for n in names}
    got = drive(backend, prompts, joins={f"{n}#1": 2 for n in names}, new_tokens=8)
    for key, out in got.items():
        ref = references[key.split("#")[0]]
        assert out[: min(8, len(ref))] == ref[:8]


def test_swap_out_and_in_resumes_exactly(backend: HFBackend, prompt_ids, references) -> None:
    actions = {
        4: [("swap_out", "france"), ("swap_out", "long")],
        7: [("swap_in", "france")],
        9: [("swap_out", "haiku")],
        10: [("swap_in", "long")],
        12: [("swap_in", "haiku"), ("swap_out", "france")],
        13: [("swap_in", "france")],
    }
    names = ("france", "haiku", "recursion", "long")
    used_before = backend.swap_pool_bytes_used()
    got = drive(backend, {n: prompt_ids[n] for n in names}, actions=actions)
    for name in names:
        assert_matches(got[name], references[name], backend.eos_token_ids)
    assert backend.swap_pool_bytes_used() == used_before == 0


def test_drop_and_recompute_resumes_exactly(backend: HFBackend, prompt_ids, references) -> None:
    actions = {
        3: [("drop", "recursion")],
        6: [("drop", "primes"), ("drop", "recursion")],
        8: [("swap_out", "hamlet")],
        9: [("drop", "hamlet")],  # dropping a swapped-out sequence frees its pool region
    }
    names = ("recursion", "primes", "hamlet")
    got = drive(backend, {n: prompt_ids[n] for n in names}, actions=actions)
    for name in names:
        assert_matches(got[name], references[name], backend.eos_token_ids)
    assert backend.swap_pool_bytes_used() == 0
    assert backend.kv_tokens_used() == 0


def test_temperature_sampling_is_seeded_and_survives_swap(backend: HFBackend, prompt_ids) -> None:
    prompts = {"haiku": prompt_ids["haiku"]}
    first = drive(backend, prompts, temperature=0.8, seed=1234)
    again = drive(
        backend, prompts, temperature=0.8, seed=1234, actions={5: [("swap_out", "haiku")], 6: [("swap_in", "haiku")]}
    )
    other = drive(backend, prompts, temperature=0.8, seed=99)
    assert first == again
    assert first != other


def test_capital_of_france_through_chat_template(backend: HFBackend, prompt_ids) -> None:
    out = drive(backend, {"france": prompt_ids["france"]}, new_tokens=12)["france"]
    if backend.eos_token_ids & set(out):
        out = out[: min(out.index(e) for e in backend.eos_token_ids if e in out)]
    assert "Paris" in backend.decode(out)


def test_state_errors_are_clear(backend: HFBackend, prompt_ids) -> None:
    ids = prompt_ids["hamlet"]
    backend.run(StepBatch([SeqWork("e", ids, 0, sample=False)]))
    with pytest.raises(SequenceStateError, match="start_pos"):
        backend.run(StepBatch([SeqWork("e", [5], len(ids) + 3)]))
    backend.swap_out("e")
    with pytest.raises(SequenceStateError, match="swapped out"):
        backend.run(StepBatch([SeqWork("e", [5], len(ids))]))
    backend.release("e")
    assert backend.kv_tokens_used() == 0 and backend.swap_pool_bytes_used() == 0
    with pytest.raises(SequenceStateError, match="unknown sequence"):
        backend.swap_out("e")


def test_failed_step_rolls_back(backend: HFBackend, prompt_ids, references, monkeypatch) -> None:
    """A forward pass that raises leaves every sequence as it was; the retry gives the same tokens."""
    be = backend.fork()
    ids = prompt_ids["hamlet"]
    first = be.run(StepBatch([SeqWork("h", ids, 0)])).next_tokens["h"]
    real_forward = be._forward

    def failing(plan):
        real_forward(plan)  # writes KV, then fails
        raise RuntimeError("boom")

    monkeypatch.setattr(be, "_forward", failing)
    with pytest.raises(RuntimeError, match="boom"):
        be.run(StepBatch([SeqWork("h", [first], len(ids)), SeqWork("new", ids, 0)]))
    assert be.seq_length("h") == len(ids) and be.seq_length("new") == 0
    assert be.kv_tokens_used() == len(ids)
    monkeypatch.setattr(be, "_forward", real_forward)
    second = be.run(StepBatch([SeqWork("h", [first], len(ids))])).next_tokens["h"]
    assert [first, second] == references["hamlet"][:2]
    be.release("h")


def test_swap_pool_full_is_reported(backend: HFBackend, prompt_ids) -> None:
    ids = prompt_ids["long"]
    small = backend.fork(swap_pool_bytes=backend.kv_bytes_per_token() * (len(ids) - 1))
    small.run(StepBatch([SeqWork("x", ids, 0, sample=False)]))
    assert not small.can_swap_out("x")
    with pytest.raises(SwapPoolFullError):
        small.swap_out("x")
    small.drop("x")
    assert small.kv_tokens_used() == 0


def test_incremental_detokenizer_with_multibyte_tokens(backend: HFBackend) -> None:
    """The core's detokenizer over this tokenizer: deltas join to the full text, emoji included."""
    from autellix.engine.detokenizer import IncrementalDetokenizer

    text = "Héllo wörld 🎉🎉 naïve café — 日本語のテキスト, family 👨\u200d👩\u200d👧 ok"
    ids = backend.encode_prompt(text)
    detok = IncrementalDetokenizer(backend.decode)
    deltas = [detok.push(ids[: i + 1]) for i in range(len(ids))]
    assert "".join(deltas) == backend.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)


# ----------------------------------------------------------------------------- model store


def test_second_resolve_reuses_the_cache(model_dir: Path) -> None:
    started = time.perf_counter()
    again = model_store.resolve_model(None)
    assert again == model_dir
    assert time.perf_counter() - started < 1.0
    assert model_store.is_converted(model_dir)
    assert not (model_dir / "lm_head.safetensors").exists()


@pytest.fixture
def tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("AUTELLIX_CACHE", str(tmp_path))
    yield tmp_path / "models"


def test_converts_once_into_the_cache(model_dir: Path, tmp_cache: Path, monkeypatch) -> None:
    """The conversion runs on first use only (its 40 s body is replaced by a copy of the real result)."""
    calls = []

    def fake_convert_into(gguf: Path, out: Path) -> None:
        calls.append(gguf)
        for item in model_dir.iterdir():
            shutil.copy2(item, out / item.name)

    monkeypatch.setattr(model_store, "_convert_into", fake_convert_into)
    first = model_store.resolve_model(None)
    second = model_store.resolve_model(None)
    assert first == second == tmp_cache / model_store.DEFAULT_MODEL_NAME
    assert len(calls) == 1 and calls[0].name == model_store.DEFAULT_GGUF_FILE
    assert model_store.resolve_model(str(first)) == first  # --model DIR takes the converted dir too


def test_concurrent_conversions_leave_one_complete_dir(tmp_path: Path) -> None:
    target = tmp_path / "models" / "m"
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def build(out: Path) -> None:
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"x" * 1000)
        barrier.wait(timeout=10)
        (out / model_store.MARKER_FILE).write_text("{}")

    def worker() -> None:
        try:
            model_store.write_dir_atomically(target, build)
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert not errors
    assert model_store.is_converted(target)
    assert sorted(p.name for p in target.parent.iterdir()) == ["m"]


def test_bad_model_path_is_explained(tmp_path: Path) -> None:
    with pytest.raises(model_store.ModelNotFoundError, match="does not exist"):
        model_store.resolve_model(str(tmp_path / "nope"))
    with pytest.raises(model_store.ModelNotFoundError, match=r"config\.json"):
        model_store.resolve_model(str(tmp_path))

"""The live benchmark: a short run writes every figure, traces round-trip through its loader, prompts
and forced output lengths come out as the trace says, and the sim backend's prefix cache."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from autellix.bench.live import ReplayConfig, Replayer, at_rate, load_programs, start_local_mesh
from autellix.engine.core import CoreCall, CoreConfig, EngineCore, FinishEvent
from autellix.engine.cost_model import llama31_8b_h100
from autellix.engine.sim_backend import SimBackend
from autellix.services.cli import main as autellix_main
from autellix.services.client import Client
from autellix.sim.generators import generate
from autellix.sim.trace import write_trace
from autellix.sim.workload import CallSpec as TraceCall
from autellix.sim.workload import ProgramSpec, prompt_lengths

FIGURES = [
    f"{m}_{s}" for m in ("latency_s", "token_latency_s", "ttft_s") for s in ("mean", "p50", "p95", "p99")
] + [
    "throughput_programs_s", "throughput_tokens_s", "calls_completed", "programs_completed", "errors",
    "programs_failed", "wait_fraction", "prefix_hit_rate", "stable",
]


def _small_programs() -> list[ProgramSpec]:
    """A chain with context, a fan-out and join (LATS-like), and a single call."""
    chain = ProgramSpec("chain", 0.0, (
        TraceCall("a", (), 12, 5),
        TraceCall("b", ("a",), 7, 6, think_s=0.2, context_parent="a"),
        TraceCall("c", ("b",), 3, 4, think_s=0.1, context_parent="b"),
    ), kind="sharegpt")
    fan = ProgramSpec("fan", 0.5, (
        TraceCall("root", (), 20, 3),
        *(TraceCall(f"x{i}", ("root",), 5 + i, 2 + i, context_parent="root") for i in range(3)),
        TraceCall("join", ("x0", "x1", "x2"), 4, 3, context_parent="x2"),
    ), kind="lats")
    single = ProgramSpec("single", 1.0, (TraceCall("only", (), 9, 8),), kind="bfcl")
    return [chain, fan, single]


def test_trace_round_trips_through_the_live_loader(tmp_path: Path) -> None:
    programs = generate("mixed", 6, seed=3)
    path = tmp_path / "trace.jsonl"
    write_trace(path, programs)
    loaded = load_programs(str(path), 100, seed=0)
    assert [p.program_id for p in loaded] == [p.program_id for p in programs]
    assert [p.calls for p in loaded] == [p.calls for p in programs]
    assert [p.kind for p in loaded] == [p.kind for p in programs]
    # arrivals keep their pattern, rescaled to one program per second on average
    gaps = [b.arrival_s - a.arrival_s for a, b in itertools.pairwise(programs)]
    lgaps = [b.arrival_s - a.arrival_s for a, b in itertools.pairwise(loaded)]
    ratio = lgaps[0] / gaps[0]
    assert all(abs(lg - g * ratio) < 1e-9 for lg, g in zip(lgaps, gaps, strict=True))
    assert sum(lgaps) / len(lgaps) == pytest.approx(1.0)
    # the simulator's sweep sees the same programs from the same file
    assert load_programs(str(path), 100, seed=0) == loaded


async def test_replay_sends_the_trace_token_counts_and_forced_lengths(nats_url: str) -> None:
    programs = at_rate(_small_programs(), 2.0)
    mesh = await start_local_mesh(nats_url, "atlas", 2, time_scale=0.02)
    client = await Client.connect(nats_url, root=mesh.root, timeout_s=30)
    try:
        outcome = await Replayer(client, programs, ReplayConfig(time_scale=0.02), tag="t").run()
    finally:
        await client.close()
        await mesh.stop()
    assert not outcome.errors and all(r is not None for r in outcome.records)
    finals = {f.call_id: f for f in outcome.finals}
    for p in programs:
        expected = prompt_lengths(p, carry_context=True, max_context=131_072)
        for c in p.calls:
            f = finals[f"t-{p.program_id}-{c.call_id}"]
            assert f.prompt_tokens == expected[c.call_id], (p.program_id, c.call_id)
            assert f.output_tokens == c.output_tokens and f.finish_reason == "length"
    # a join runs after all its parents; a child after its parent
    by_id = {(p.program_id, c.call_id): c for p in programs for c in p.calls}
    assert by_id[("fan", "join")].parents == ("x0", "x1", "x2")
    hits = sum(b.cache_stats().hit_tokens for b in mesh.backends)
    assert hits > 0  # context carried: histories found in the prefix cache


def test_short_bench_writes_every_figure(tmp_path: Path, nats_url: str) -> None:
    trace = tmp_path / "small.jsonl"
    write_trace(trace, _small_programs())
    out = tmp_path / "out.json"
    code = autellix_main([
        "bench", "--nats", nats_url, "--workload", str(trace), "--rate", "2", "--compare", "fcfs,plas",
        "--sim-time-scale", "0.02", "--engines", "2", "--json", str(out), "--no-progress", "--with-sim",
        "--warmup", "0", "--drain", "0", "--balancer", "locality,round-robin", "--kv-scale", "0.5",
    ])
    assert code == 0
    report = json.loads(out.read_text())
    assert [(p["policy"], p["balancer"]) for p in report["points"]] == [
        ("fcfs", "locality"), ("plas", "locality"), ("fcfs", "round-robin"), ("plas", "round-robin"),
    ]
    for point in report["points"]:
        missing = [k for k in FIGURES if k not in point]
        assert not missing, missing
        assert point["errors"] == 0 and point["programs_completed"] == 3
        assert point["calls_completed"] == point["calls_offered"] == 9
        assert point["latency_s_mean"] > 0 and point["ttft_s_p50"] > 0
    assert report["kv_capacity_tokens"] == llama31_8b_h100().kv_capacity_tokens // 2
    overs = {(r["policy"], r["balancer"], r["over"]) for r in report["ratios"]}
    assert overs == {
        ("plas", "locality", "fcfs"), ("plas", "round-robin", "fcfs"),
        ("fcfs", "round-robin", "locality"), ("plas", "round-robin", "locality"),
    }
    # the simulator ran each point with the same balancer
    assert [(a["policy"], a["balancer"]) for a in report["agreement"]] == [
        (p["policy"], p["balancer"]) for p in report["points"]
    ]
    assert [s["balancer"] for s in report["sim_points"]] == [p["balancer"] for p in report["points"]]
    assert "round-robin" in report["analysis"]["by_balancer"]
    assert "balancer_ratio_to_round_robin" in report["analysis"]


def test_bench_compares_engine_memory_variants(tmp_path: Path, nats_url: str) -> None:
    trace = tmp_path / "small.jsonl"
    write_trace(trace, _small_programs())
    out = tmp_path / "out.json"
    code = autellix_main([
        "bench", "--nats", nats_url, "--workload", str(trace), "--rate", "2", "--compare", "fcfs",
        "--memory", "lru,all", "--sim-time-scale", "0.02", "--json", str(out), "--no-progress",
        "--warmup", "0", "--drain", "0",
    ])
    assert code == 0
    report = json.loads(out.read_text())
    assert [p["memory"] for p in report["points"]] == ["lru", "all"]
    assert all(p["errors"] == 0 and p["programs_completed"] == 3 for p in report["points"])
    assert [(r["memory"], r["over"]) for r in report["ratios"]] == [("all", "lru")]


@pytest.mark.parametrize(
    ("memory", "retention", "tier", "door"),
    [
        ("lru", "lru", False, False),
        ("tier", "program", True, False),
        ("door", "lru", False, True),
        ("all", "program", True, True),
    ],
)
async def test_each_memory_variant_sets_the_engines_and_the_door(
    nats_url: str, memory: str, retention: str, tier: bool, door: bool
) -> None:
    """The simulator's variants, live: ``lru`` is the old behaviour (the door is on by default in a deployed
    scheduler, so the baseline turns it off), ``all`` what ``autellix up`` runs."""
    from autellix.bench.live import start_local_mesh

    mesh = await start_local_mesh(nats_url, "fcfs", 1, 0.02, memory=memory)
    try:
        spec = mesh.engines[0].config.backend
        assert (spec.retention, spec.kv_tier_tokens > 0, mesh.scheduler.config.door) == (retention, tier, door)
    finally:
        await mesh.stop()


def test_bench_rejects_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "o.json")
    assert autellix_main(["bench", "--workload", "nope", "--rate", "1", "--json", out]) == 2
    assert autellix_main(["bench", "--workload", "bfcl", "--json", out]) == 2
    assert autellix_main(["bench", "--workload", "bfcl", "--rate", "1", "--compare", "x", "--json", out]) == 2
    assert autellix_main(["bench", "--workload", "bfcl", "--rate", "1", "--balancer", "x", "--json", out]) == 2
    assert autellix_main(["bench", "--workload", "bfcl", "--rate", "1", "--kv-scale", "0", "--json", out]) == 2
    assert autellix_main(["bench", "--workload", "bfcl", "--rate", "1", "--memory", "lfu", "--json", out]) == 2
    assert "error" in capsys.readouterr().err


def _run_to_end(core: EngineCore, backend: object) -> list[FinishEvent]:
    done: list[FinishEvent] = []
    while not core.idle:
        outcome = core.step(0.0)
        assert outcome is not None
        done += [e for e in outcome.events if isinstance(e, FinishEvent)]
    return done


def test_sim_prefix_cache_saves_a_programs_history() -> None:
    backend = SimBackend(time_scale=0)
    core = EngineCore(backend, CoreConfig(kv_capacity_tokens=10_000))
    first = "qa0 " + "www " * 99
    core.add(CoreCall("c1", "p", backend.encode_prompt(first), 3, ignore_eos=True), 0.0)
    (done,) = _run_to_end(core, backend)
    assert done.finish_reason == "length" and done.text == " tok" * 3
    follow = f"{first}{done.text} qa1 www"
    core.add(CoreCall("c2", "p", backend.encode_prompt(follow), 2, ignore_eos=True), 0.0)
    core.add(CoreCall("c3", "other", backend.encode_prompt(follow), 2, ignore_eos=True), 0.0)
    _run_to_end(core, backend)
    stats = backend.cache_stats()
    # c2 reuses c1's prompt and answer (103 tokens); c3 is another program: no reuse
    assert stats.hit_tokens == 103
    assert stats.prompt_tokens == 100 + 105 + 105


@pytest.mark.model
def test_hf_backend_honours_forced_output_length(hf_backend) -> None:  # type: ignore[no-untyped-def]
    core = EngineCore(hf_backend, CoreConfig(max_batch=4, kv_capacity_tokens=4096))
    prompt = hf_backend.encode_chat([{"role": "user", "content": "Reply with the single word: yes"}])
    core.add(CoreCall("free", "p", list(prompt), 48), 0.0)
    core.add(CoreCall("forced", "p", list(prompt), 48, ignore_eos=True), 0.0)
    done = {e.call_id: e for e in _run_to_end(core, hf_backend)}
    assert done["forced"].finish_reason == "length"
    assert len(done["forced"].state.output_ids) == 48
    # without ignore_eos the model stops by itself on this prompt, well before the limit
    assert done["free"].finish_reason == "stop" and len(done["free"].state.output_ids) < 48

from __future__ import annotations

import numpy as np
import pytest

from autellix.sim.distributions import CountDist, TokenDist, clipped_lognormal_mean, discrete_lognormal_mean
from autellix.sim.generators import generate
from autellix.sim.workload import CallSpec, ProgramSpec, WorkloadError, prompt_lengths, validate


def test_fitted_means_are_exact_after_clipping() -> None:
    t = TokenDist(mean=255.65, sigma=1.0, lo=4, hi=4096)
    assert clipped_lognormal_mean(t.mu, t.sigma, t.lo, t.hi) == pytest.approx(255.65, rel=1e-9)
    c = CountDist(mean=6.66, sigma=1.0, lo=1, hi=80)
    assert discrete_lognormal_mean(c.mu, c.sigma, c.lo, c.hi) == pytest.approx(6.66, rel=1e-9)
    with pytest.raises(ValueError):
        TokenDist(mean=5000, sigma=1.0, lo=4, hi=4096)


@pytest.mark.parametrize(
    ("name", "calls", "max_calls", "prompt", "output"),
    [
        ("sharegpt", 6.66, 80, 255.65, 276.81),
        ("bfcl", 10.75, 70, 735.06, 34.14),
        ("lats", 159.7, 400, 467.24, 72.64),
    ],
)
def test_generators_match_the_published_statistics(
    name: str, calls: float, max_calls: int, prompt: float, output: float
) -> None:
    n = 400 if name == "lats" else 3000
    programs = generate(name, n, seed=1)
    per_program = np.array([len(p.calls) for p in programs])
    new = np.array([c.new_prompt_tokens for p in programs for c in p.calls])
    out = np.array([c.output_tokens for p in programs for c in p.calls])
    assert per_program.mean() == pytest.approx(calls, rel=0.08)
    assert per_program.max() <= max_calls
    assert new.mean() == pytest.approx(prompt, rel=0.05)
    assert out.mean() == pytest.approx(output, rel=0.05)
    for p in programs[:50]:
        validate(p)


def test_lats_is_a_tree_of_fan_outs_and_joins() -> None:
    (p,) = generate("lats", 1, seed=3)
    assert len(p.calls) % 10 == 0
    by_id = {c.call_id: c for c in p.calls}
    evals = [c for c in p.calls if c.call_id.startswith("v")]
    assert all(c.parents == (c.context_parent,) for c in evals)
    later = [c for c in p.calls if c.call_id.startswith("e") and not c.call_id.startswith("e0.")]
    for c in later:
        assert len(c.parents) == 5 and all(by_id[x].call_id.startswith("v") for x in c.parents)
        assert c.context_parent is not None and c.context_parent.startswith("e")


def test_mixed_is_an_equal_mix_and_seeds_are_deterministic() -> None:
    programs = generate("mixed", 300, seed=5)
    kinds = [p.kind for p in programs]
    assert {k: kinds.count(k) for k in set(kinds)} == {"sharegpt": 100, "bfcl": 100, "lats": 100}
    assert generate("mixed", 300, seed=5) == programs
    assert generate("mixed", 300, seed=6) != programs
    arrivals = [p.arrival_s for p in programs]
    assert arrivals == sorted(arrivals)
    assert np.mean(np.diff(arrivals)) == pytest.approx(1.0, rel=0.2)


def test_prompt_lengths_carry_the_context_chain() -> None:
    p = ProgramSpec("p", 0.0, (
        CallSpec("a", (), 10, 5),
        CallSpec("b", ("a",), 3, 7, context_parent="a"),
        CallSpec("c", ("b",), 4, 1, context_parent="b"),
        CallSpec("d", ("a",), 2, 1, context_parent=None),
    ))
    assert prompt_lengths(p, True, 10_000) == {"a": 10, "b": 18, "c": 29, "d": 2}
    assert prompt_lengths(p, False, 10_000) == {"a": 10, "b": 3, "c": 4, "d": 2}
    assert prompt_lengths(p, True, 20)["c"] == 19  # cut to the context window minus the output


def test_validate_rejects_forward_references() -> None:
    with pytest.raises(WorkloadError):
        validate(ProgramSpec("p", 0.0, (CallSpec("a", ("b",), 1, 1), CallSpec("b", (), 1, 1))))
    with pytest.raises(WorkloadError):
        validate(ProgramSpec("p", 0.0, (CallSpec("a", (), 1, 1), CallSpec("a", (), 1, 1))))
    with pytest.raises(WorkloadError):
        validate(ProgramSpec("p", 0.0, (CallSpec("a", (), 0, 1),)))


def test_new_agent_shapes() -> None:
    from autellix.sim.workload import prompt_lengths

    chat = generate("chat-think", 200, seed=2)
    thinks = [c.think_s for p in chat for c in p.calls[1:]]
    assert 60 < np.mean(thinks) < 200  # minutes of human think time
    fan = generate("fanout", 60, seed=2)
    for p in fan[:20]:
        validate(p)
        widths = [sum(1 for c in p.calls if c.parents == (plan.call_id,)) for plan in p.calls if c_is_plan(plan)]
        assert widths and all(20 <= w <= 80 for w in widths)
    coder = generate("coder", 100, seed=2)
    longest = [max(prompt_lengths(p, True, 131_072).values()) for p in coder]
    assert np.median(longest) > 20_000 and all(len(p.calls) >= 25 for p in coder)
    assert all(len(p.calls[i].parents) == 1 for p in coder for i in range(1, len(p.calls)))


def c_is_plan(c: CallSpec) -> bool:
    return c.call_id.startswith("plan")

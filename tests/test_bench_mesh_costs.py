"""bench/nats_hop.py measures a hop between two processes; bench/mesh_costs.py's stamping paths run
against a real nats-server and route every call (the service path once broke quietly: its stand-in
message lacked a subject, and the tenant bounds refused all calls past 4,096); the ``sim`` backend's
memoised tokenizer gives the ids it always gave."""

from __future__ import annotations

import json
import zlib

from autellix.bench import nats_hop
from autellix.bench.mesh_costs import measure_stamps
from autellix.engine import sim_backend
from autellix.engine.sim_backend import SimBackend


async def test_every_stamping_path_routes_every_call(nats_url: str) -> None:
    out = await measure_stamps(nats_url, 300, "atlas")
    assert out["service_path_routed"] == 300
    for path in ("core", "service_path", "through_nats"):
        assert out[f"{path}_calls_per_s"] > 0 and out[f"{path}_cpu_us_per_call"] >= 0


def test_sim_tokenizer_memo_gives_the_crc_ids_and_stays_bounded(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(sim_backend, "_MAX_WORD_IDS", 8)
    monkeypatch.setattr(sim_backend, "_WORD_IDS", {})
    backend = SimBackend(time_scale=0)
    for text in ("the cat sat on the mat", " ".join(f"w{i}" for i in range(40)), "the cat again"):
        expected = [zlib.crc32(w.encode()) % 50_000 for w in text.split()]
        assert backend.encode_prompt(text) == expected
        assert backend.encode_prompt(text) == expected  # from the memo
        assert len(sim_backend._WORD_IDS) <= 8 + len(text.split())


def test_nats_hop_reports_one_hop_between_two_processes(capsys) -> None:  # type: ignore[no-untyped-def]
    assert nats_hop.main(["--messages", "10", "--gap-s", "0.001"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 < summary["p50_ms"] <= summary["p90_ms"]

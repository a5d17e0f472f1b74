"""One name per concept: the program's figures under their one name on the wire (the older names sent too
and accepted alone), the simulator's flags under the engine's names, class names that mean one thing."""

from __future__ import annotations

import argparse
import json

import pytest
from eventkit import completed

import autellix.engine.core as engine_core
import autellix.sim.engine_model as sim_engine
import autellix.sim.simulator as simulator
from autellix.engine.sim_backend import SimBackend
from autellix.proto import ProgramService, ProgramSummary, decode, encode
from autellix.services.tracker.process_table import ProcessTable, ProgramRecord, from_record, to_record
from autellix.sim import cli as sim_cli


def test_program_service_sends_both_names_and_reads_either() -> None:
    update = ProgramService(program_id="p", program_service_s=2.5, program_wait_s=0.5)
    body = json.loads(encode(update))
    assert (body["program_service_s"], body["service_s"]) == (2.5, 2.5)
    assert (body["program_wait_s"], body["waiting_s"]) == (0.5, 0.5)
    older = decode(b'{"program_id": "p", "service_s": 4.0, "waiting_s": 1.0}', ProgramService)
    assert (older.program_service_s, older.program_wait_s) == (4.0, 1.0)
    newer = decode(b'{"program_id": "p", "program_service_s": 3.0}', ProgramService)
    assert (newer.program_service_s, newer.service_s, newer.program_wait_s) == (3.0, 3.0, 0.0)
    # Python callers of the older names keep working too
    assert ProgramService(program_id="p", service_s=1.5).program_service_s == 1.5


def test_the_tracker_publishes_the_program_figures_under_both_names() -> None:
    table = ProcessTable()
    done = completed("p", "c", 2.0, engine_id="e", queue_wait_s=0.25)
    update = table.on_completed(done, now=1.0)
    assert update is not None
    assert (update.program_service_s, update.program_wait_s) == (2.0, 0.25)
    body = json.loads(encode(update))
    assert (body["service_s"], body["waiting_s"]) == (2.0, 0.25)
    row = json.loads(encode(table.summaries()[0]))
    assert (row["program_service_s"], row["service_s"]) == (2.0, 2.0)
    assert (row["program_wait_s"], row["waiting_s"]) == (0.25, 0.25)
    older_row = (
        b'{"program_id":"p","service_s":1.0,"critical_path_s":1.0,"waiting_s":0.5,"calls_completed":1,'
        b'"active_calls":0,"engines":[],"first_seen_at":0.0,"last_activity_at":0.0}'
    )
    assert decode(older_row, ProgramSummary).program_wait_s == 0.5


def test_a_tracker_record_written_before_the_rename_restores_its_wait() -> None:
    table = ProcessTable()
    table.on_completed(
        completed("p", "c", 1.0, engine_id="e", queue_wait_s=0.75),
        now=1.0,
    )
    entry = table.get("p")
    assert entry is not None
    record = json.loads(encode(to_record(entry)))
    assert record["program_wait_s"] == record["waiting_s"] == 0.75
    del record["program_wait_s"]  # as an older tracker wrote it
    restored = from_record(decode(json.dumps(record).encode(), ProgramRecord), now=2.0)
    assert restored.program_wait_s == 0.75


def _sim_options(*flags: str) -> sim_cli.SimOptions:
    parser = argparse.ArgumentParser()
    sim_cli.add_arguments(parser)
    return sim_cli.parse(parser.parse_args(["--workload", "bfcl", "--rates", "1", "--json", "x.json", *flags]))


@pytest.mark.parametrize(("flags", "every"), [((), 8), (("--schedule-every", "3"),  3), (("--sched-every", "5"), 5)])
def test_the_simulator_takes_the_engines_flag_for_the_scheduling_interval(flags: tuple[str, ...], every: int) -> None:
    assert _sim_options(*flags).config.schedule_every == every
    assert sim_engine.SIM_SCHEDULE_EVERY == 8 and engine_core.CoreConfig().schedule_every == 4


def test_balancer_flag_and_its_alias() -> None:
    assert _sim_options("--engines", "2", "--balancer", "round-robin").balancers == ["round-robin"]
    assert _sim_options("--engines", "2", "--lb", "least-used").balancers == ["least-used"]


def test_class_names_mean_one_thing() -> None:
    assert not hasattr(engine_core, "CallSpec") and hasattr(engine_core, "CoreCall")
    assert not hasattr(sim_engine, "EngineConfig") and hasattr(sim_engine, "SimEngineConfig")
    assert not hasattr(simulator, "ProgramRecord") and hasattr(simulator, "ProgramResult")
    core = engine_core.EngineCore(SimBackend(), engine_core.CoreConfig(kv_capacity_tokens=1000))
    assert core.kv_capacity_tokens == 1000 and not hasattr(core, "kv_capacity")


def test_sim_reports_keep_the_older_config_names() -> None:
    opts = _sim_options("--schedule-every", "6")
    report = sim_cli._config_json(opts.config, opts)
    assert report["schedule_every"] == report["sched_every_steps"] == 6
    assert report["cost"]["kv_capacity_tokens"] == report["cost"]["kv_budget_tokens"] == 400_000

"""The settings tables: env vars and flags reach the right fields, README's table is the generated one,
and every AUTELLIX_* variable the code reads is documented."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import pytest

from autellix.services.cli import UP_OWN_FLAGS, _config, build_parser
from autellix.services.config_doc import BEGIN, END, SERVICES, markdown_table
from autellix.services.engine.config import EngineConfig
from autellix.services.nats_config import DEFAULT_NATS_URL, NatsConfig, config_for_log
from autellix.services.scheduler.config import SchedulerConfig, parse_spill_gate
from autellix.services.scheduler.core import SchedulerCore
from autellix.services.settings import (
    Setting,
    add_flags,
    from_env,
    get_path,
    parse_bool,
    parse_finite,
    parse_names_list,
    parse_port,
    parse_url_list,
    settings_of,
)
from autellix.services.tracker.config import TrackerConfig

REPO = Path(__file__).resolve().parents[1]
#: AUTELLIX_* names that are not settings: a JetStream stream's prefix, the compose test's own switches, and
#: the address compose publishes ports on (a compose interpolation, compose/README.md "Ports")
NOT_SETTINGS = {"AUTELLIX_COMPLETED_", "AUTELLIX_COMPOSE_LOCAL", "AUTELLIX_WHEELS", "AUTELLIX_PUBLISH_ADDR"}


def _sample(cls: type, s: Setting) -> tuple[str, Any]:
    """A value for ``s`` unlike its default, as text and as the field should hold it."""
    default = get_path(cls(), s.field)
    if s.choices:
        text = next(c for c in reversed(s.choices) if c != default)
        return text, text
    if s.parse is parse_bool:
        return ("no", False) if default else ("yes", True)
    if s.parse is parse_url_list:
        return "nats://a:1, nats://b:2", ("nats://a:1", "nats://b:2")
    if s.parse is parse_port:
        return "9999", 9999
    if s.parse is parse_names_list:
        return "alice, bob,", ("alice", "bob")
    if s.parse is int:
        return "7", 7
    if s.parse is parse_finite:
        return "0.5", 0.5
    if s.parse is parse_spill_gate:
        return "none", None
    return f"v-{s.field}", f"v-{s.field}"


@pytest.mark.parametrize("cls", [NatsConfig, *SERVICES.values()], ids=lambda c: c.__name__)
def test_every_env_var_sets_its_field(cls: type) -> None:
    table = settings_of(cls)
    env = {s.env: _sample(cls, s)[0] for s in table}
    config = from_env(cls, env)
    for s in table:
        assert get_path(config, s.field) == _sample(cls, s)[1], s.env
    assert from_env(cls, {}) == cls() or cls is EngineConfig  # engine ids are random


@pytest.mark.parametrize("command", list(SERVICES))
def test_every_flag_sets_its_field_over_the_env(command: str, monkeypatch: pytest.MonkeyPatch) -> None:
    cls = SERVICES[command]
    argv = [command]
    for s in settings_of(cls):
        if s.flag is None:
            continue
        text, _ = _sample(cls, s)
        monkeypatch.setenv(s.env, text)  # the flag must win over it
        if s.boolean:
            argv.append(s.flag if text == "yes" else f"--no-{s.flag[2:]}")
        else:
            fraction = s.parse in (parse_finite, parse_spill_gate)
            argv += [s.flag, "0.25" if fraction else ("3" if s.parse in (int, parse_port) else text)]
    args = build_parser().parse_args(argv)
    config = _config(cls, args)
    for s in settings_of(cls):
        if s.flag is None or s.boolean or s.choices or s.parse in (str, parse_url_list, parse_names_list):
            continue  # same text as the env var: nothing to tell apart
        want = 0.25 if s.parse in (parse_finite, parse_spill_gate) else 3
        assert get_path(config, s.field) == want, s.flag


def test_up_takes_every_service_flag_once_and_policy_for_both() -> None:
    args = build_parser().parse_args(["up", "--policy", "fcfs", "--max-tokens-ceiling", "99", "--heartbeat-s", "0.5"])
    assert _config(SchedulerConfig, args, UP_OWN_FLAGS).policy == "fcfs"
    engine = _config(EngineConfig, args, UP_OWN_FLAGS)
    assert engine.core.policy == "fcfs" and engine.core_config.policy == "fcfs"
    assert engine.heartbeat_s == 0.5
    assert _config(SchedulerConfig, args, UP_OWN_FLAGS).max_tokens_ceiling == 99
    assert args.port == 4222 and args.metrics_port == 9100  # up's own, not the gateway's or a service's


def test_bad_env_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="AUTELLIX_MAX_BATCH='lots'"):
        EngineConfig.from_env({"AUTELLIX_MAX_BATCH": "lots"})
    with pytest.raises(ValueError, match="AUTELLIX_POLICY='lifo'"):
        SchedulerConfig.from_env({"AUTELLIX_POLICY": "lifo"})
    with pytest.raises(ValueError, match="AUTELLIX_TRACKER_PERSIST"):
        TrackerConfig.from_env({"AUTELLIX_TRACKER_PERSIST": "maybe"})
    monkeypatch.setenv("AUTELLIX_KV_TOKENS", "-")
    with pytest.raises(SystemExit, match="autellix: AUTELLIX_KV_TOKENS="):
        _config(EngineConfig, build_parser().parse_args(["engine"]))


def test_empty_env_var_counts_as_unset() -> None:
    assert TrackerConfig.from_env({"AUTELLIX_PROGRAM_TTL_S": "", "AUTELLIX_NATS": " "}) == TrackerConfig()


def test_engine_core_config_takes_the_backends_limits() -> None:
    env = {"AUTELLIX_MAX_BATCH": "5", "AUTELLIX_KV_TOKENS": "1000", "AUTELLIX_SCHEDULE_EVERY": "2"}
    config = EngineConfig.from_env(env)
    core = config.core_config
    assert (core.max_batch, core.kv_capacity_tokens, core.schedule_every) == (5, 1000, 2)


def test_nats_server_url_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTELLIX_CACHE", str(tmp_path / "cache"))
    creds = tmp_path / "x.creds"
    creds.write_text("nats://u:p@h:1\n")
    # a credentials file wins over the URL (as --creds always did)
    assert NatsConfig(urls=("nats://a:1",), creds=str(creds)).server_url() == "nats://u:p@h:1"
    assert NatsConfig(urls=("nats://a:1", "nats://b:2")).server_url() == "nats://a:1,nats://b:2"
    assert NatsConfig().server_url(client=True) == DEFAULT_NATS_URL
    written = tmp_path / "cache" / "credentials" / "client.creds"
    written.parent.mkdir(parents=True)
    written.write_text("nats://client:pw@h:2\n")
    assert NatsConfig().server_url(client=True) == "nats://client:pw@h:2"  # what `autellix up` wrote
    assert NatsConfig().server_url() == DEFAULT_NATS_URL  # services never pick it up
    bad = tmp_path / "bad.creds"
    bad.write_text("hello\n")
    with pytest.raises(ValueError, match="not an Autellix credentials file"):
        NatsConfig(creds=str(bad)).server_url()


def test_tls_cert_needs_its_key() -> None:
    with pytest.raises(ValueError, match="needs its key"):
        NatsConfig(tls_cert="c.pem")
    assert NatsConfig().tls_context() is None


def test_start_up_log_shows_no_password() -> None:
    config = TrackerConfig(nats=NatsConfig.at("nats://tracker:s3cret@h:1,nats://tracker:s3cret@h:2", "r"))
    shown = config_for_log(config)
    assert "s3cret" not in repr(shown)
    assert "tracker:***@h:1" in repr(shown) and shown["idle_ttl_s"] == config.idle_ttl_s


def test_readme_config_table_is_the_generated_one() -> None:
    readme = (REPO / "README.md").read_text()
    start, end = readme.index(BEGIN), readme.index(END) + len(END)
    assert readme[start:end] == markdown_table(), "run: python -m autellix.services.config_doc --write README.md"


def test_every_env_var_the_code_reads_is_documented() -> None:
    readme = (REPO / "README.md").read_text()
    env_cells = re.findall(r"^\| (`AUTELLIX_[^|]*)\|", readme, flags=re.M)  # a name and its aliases
    documented = {name for cell in env_cells for name in re.findall(r"AUTELLIX_[A-Z0-9_]+", cell)}
    read: set[str] = set()
    for folder in ("services", "engine", "proto", "policy", "sim", "compose"):
        for path in (REPO / folder).rglob("*"):
            if path.suffix in (".py", ".yml", ".yaml") and path.is_file():
                read |= set(re.findall(r"AUTELLIX_[A-Z0-9_]+", path.read_text()))
    assert {"AUTELLIX_NATS", "AUTELLIX_LOG_LEVEL", "AUTELLIX_CACHE"} <= read  # the scan sees the code
    missing = sorted(read - documented - NOT_SETTINGS)
    assert not missing, f"read by the code, not in README's configuration table: {missing}"


def test_older_names_stay_accepted_as_aliases() -> None:
    aliased = [s for cls in SERVICES.values() for s in settings_of(cls) if s.flag_aliases or s.env_aliases]
    assert {(s.flag, s.flag_aliases, s.env, s.env_aliases) for s in aliased} == {
        ("--kv-capacity-tokens", ("--kv-tokens",), "AUTELLIX_KV_CAPACITY_TOKENS", ("AUTELLIX_KV_TOKENS",))
    }
    for flag in ("--kv-capacity-tokens", "--kv-tokens"):
        args = build_parser().parse_args(["engine", flag, "1234"])
        assert _config(EngineConfig, args).core_config.kv_capacity_tokens == 1234, flag
    assert EngineConfig.from_env({"AUTELLIX_KV_TOKENS": "99"}).backend.kv_capacity_tokens == 99
    both = {"AUTELLIX_KV_TOKENS": "99", "AUTELLIX_KV_CAPACITY_TOKENS": "77"}
    assert EngineConfig.from_env(both).backend.kv_capacity_tokens == 77  # the name wins over its alias
    with pytest.raises(ValueError, match="AUTELLIX_KV_TOKENS='x'"):
        EngineConfig.from_env({"AUTELLIX_KV_TOKENS": "x"})
    parser = argparse.ArgumentParser()
    add_flags(parser, [EngineConfig])
    shown = " ".join(parser.format_help().split())
    assert "--kv-capacity-tokens KV_CAPACITY_TOKENS, --kv-tokens KV_CAPACITY_TOKENS" in shown
    assert "(env AUTELLIX_KV_CAPACITY_TOKENS or AUTELLIX_KV_TOKENS;" in shown


def test_the_scheduler_core_takes_every_setting_it_names_from_the_config() -> None:
    config = SchedulerConfig(
        policy="atlas", balancer="least-used", max_tokens_ceiling=99, call_deadline_s=7.0, max_calls_per_program=5,
        tenant_half_life_s=11.0, max_calls_per_tenant=3, max_tokens_per_tenant=13, tenant_users=("gw",),
    )  # fmt: skip
    core = SchedulerCore.from_config(config)
    assert (core.policy, core.balancer.name, core.max_tokens_ceiling) == ("atlas", "least-used", 99)
    assert (core.call_deadline_s, core.max_calls_per_program, core.tenants.half_life_s) == (7.0, 5, 11.0)
    limits = core.tenant_limits
    assert (limits.max_calls, limits.max_tokens, limits.trusted_users) == (3, 13, frozenset({"gw"}))
    assert core.scheduler_id.startswith("sched-")  # not a setting: made by the core

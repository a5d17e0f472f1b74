from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import ClassVar

from autellix.engine.core import CoreConfig
from autellix.engine.factory import BACKENDS, DEFAULT_TIER_SCALE, RETENTIONS, BackendSpec
from autellix.policy.variants import SERVING_POLICIES
from autellix.services.nats_config import NATS_SETTINGS, NatsConfig
from autellix.services.settings import METRICS_PORT, Setting, from_env, parse_finite


def _default_engine_id() -> str:
    return f"engine-{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True, slots=True)
class EngineConfig:
    nats: NatsConfig = field(default_factory=NatsConfig)
    engine_id: str = field(default_factory=_default_engine_id)
    #: the model: its backend, and the limits the model's memory sets (running calls, KV tokens)
    backend: BackendSpec = field(default_factory=BackendSpec)
    #: the engine core's queues and scheduling points; its ``max_batch`` and ``kv_capacity_tokens``
    #: are the backend's (see :attr:`core_config`), whatever they say here
    core: CoreConfig = field(default_factory=CoreConfig)
    heartbeat_s: float = 1.0
    #: on SIGTERM, how long running calls may take to finish before they are failed
    drain_timeout_s: float = 30.0
    #: Prometheus metrics on this port (0 = any free one); None = off
    metrics_port: int | None = None
    #: calls held beyond a full running batch; a call past it is shed with ``rate_limited``
    max_waiting: int = 1024
    #: a model step running longer than this means the engine is stuck: it stops heartbeating and exits
    step_stuck_s: float = 300.0

    SETTINGS: ClassVar[tuple[Setting, ...]] = (
        *NATS_SETTINGS,
        Setting("engine_id", "AUTELLIX_ENGINE_ID", "--engine-id", str, "this engine's id (a subject token)",
                default_text="`engine-<random>`"),
        Setting("backend.name", "AUTELLIX_BACKEND", "--backend", str, "model backend", choices=BACKENDS),
        Setting("backend.model", "AUTELLIX_MODEL", "--model", str, "any local Hugging Face model directory",
                default_text="SmolLM2-135M-Instruct"),
        Setting("backend.device", "AUTELLIX_DEVICE", "--device", str, "`hf` backend: `cpu` or `cuda[:N]`"),
        Setting("backend.threads", "AUTELLIX_THREADS", "--threads", int, "`hf` backend: torch threads",
                default_text="torch's default"),
        Setting("core.policy", "AUTELLIX_POLICY", "--policy", str,
                "its local queues; announced in its heartbeat (`policy`), and schedulers of another policy route "
                "nothing to it (each logs it once)", choices=SERVING_POLICIES),
        Setting("core.schedule_every", "AUTELLIX_SCHEDULE_EVERY", "--schedule-every", int,
                "a scheduling point (preemption) every N steps"),
        Setting("core.preempt_mode", "AUTELLIX_PREEMPT_MODE", "--preempt-mode", str,
                "how a displaced call gives up its KV (`auto`: the cheaper by its own estimates)",
                choices=("auto", "swap", "recompute")),
        Setting("backend.max_batch", "AUTELLIX_MAX_BATCH", "--max-batch", int, "running calls"),
        Setting("backend.kv_capacity_tokens", "AUTELLIX_KV_CAPACITY_TOKENS", "--kv-capacity-tokens", int,
                "KV capacity in tokens", flag_aliases=("--kv-tokens",), env_aliases=("AUTELLIX_KV_TOKENS",)),
        Setting("backend.retention", "AUTELLIX_RETENTION", "--retention", str,
                "eviction order of retained contexts (finished calls' KV kept for the program's next call): "
                "`program` = contexts another one contains, then ended programs', then least recently used; "
                "`lru` = least recently used only", choices=RETENTIONS),
        Setting("backend.kv_tier_tokens", "AUTELLIX_KV_TIER_TOKENS", "--kv-tier-tokens", int,
                "CPU tier for evicted contexts of live programs, swapped back in when cheaper than re-prefilling; "
                "0 = none (`sim` backend; `hf` where it supports it)",
                default_text=f"{DEFAULT_TIER_SCALE} x `--kv-capacity-tokens`"),
        Setting("core.max_batched_tokens", "AUTELLIX_MAX_BATCHED_TOKENS", "--max-batched-tokens", int,
                "tokens per step (decode + prefill chunks)"),
        Setting("backend.sim_time_scale", "AUTELLIX_SIM_TIME_SCALE", "--sim-time-scale", parse_finite,
                "`sim` backend: factor on modelled step times, 0 = instant"),
        Setting("heartbeat_s", "AUTELLIX_HEARTBEAT_S", "--heartbeat-s", parse_finite, "seconds between heartbeats"),
        Setting("drain_timeout_s", "AUTELLIX_DRAIN_TIMEOUT_S", "--drain-timeout-s", parse_finite,
                "on SIGTERM, time for running calls to finish"),
        Setting("max_waiting", "AUTELLIX_MAX_WAITING", "--max-waiting", int,
                "calls held beyond a full running batch; more are shed with `rate_limited`"),
        Setting("step_stuck_s", "AUTELLIX_STEP_STUCK_S", "--step-stuck-s", parse_finite,
                "a model step running longer means the engine is stuck: it stops heartbeating and exits 1"),
        METRICS_PORT,
    )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> EngineConfig:
        return from_env(cls, env)

    @property
    def core_config(self) -> CoreConfig:
        """The core's config: :attr:`core`, sized to the backend's batch and KV capacity."""
        return replace(self.core, max_batch=self.backend.max_batch, kv_capacity_tokens=self.backend.kv_capacity_tokens)

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field

from autellix.engine.factory import BackendSpec
from autellix.proto import DEFAULT_ROOT
from autellix.services.metrics import metrics_port_from_env
from autellix.services.nats_conn import DEFAULT_NATS_URL


def _default_engine_id() -> str:
    return f"engine-{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True, slots=True)
class EngineConfig:
    nats_url: str = DEFAULT_NATS_URL
    root: str = DEFAULT_ROOT
    engine_id: str = field(default_factory=_default_engine_id)
    backend: BackendSpec = field(default_factory=BackendSpec)
    #: tokens per step across the batch (decode + chunked prefill)
    max_batched_tokens: int = 2048
    heartbeat_s: float = 1.0
    #: on SIGTERM, how long running calls may take to finish before they are failed
    drain_timeout_s: float = 30.0
    #: local queue discipline: fcfs | mlfq | plas | atlas (match the schedulers' policy)
    policy: str = "plas"
    #: a scheduling point (re-plan with preemption) every N steps
    schedule_every: int = 4
    #: auto | swap | recompute
    preempt_mode: str = "auto"
    #: Prometheus metrics on this port (0 = any free one); None = off
    metrics_port: int | None = None
    #: calls held beyond a full running batch; a call past it is shed with ``rate_limited``
    max_waiting: int = 1024
    #: a model step running longer than this means the engine is stuck: it stops heartbeating and exits
    step_stuck_s: float = 300.0

    @classmethod
    def from_env(cls) -> EngineConfig:
        env = os.environ
        d = cls()
        model = env.get("AUTELLIX_MODEL") or None
        backend = BackendSpec(
            name=env.get("AUTELLIX_BACKEND", "hf"),
            model=model,
            device=env.get("AUTELLIX_DEVICE", "cpu"),
            max_batch=int(env.get("AUTELLIX_MAX_BATCH", d.backend.max_batch)),
            kv_capacity_tokens=int(env.get("AUTELLIX_KV_TOKENS", d.backend.kv_capacity_tokens)),
            sim_time_scale=float(env.get("AUTELLIX_SIM_TIME_SCALE", d.backend.sim_time_scale)),
            threads=int(env["AUTELLIX_THREADS"]) if env.get("AUTELLIX_THREADS") else None,
            retention=env.get("AUTELLIX_RETENTION", d.backend.retention),
            kv_tier_tokens=int(env["AUTELLIX_KV_TIER_TOKENS"]) if env.get("AUTELLIX_KV_TIER_TOKENS") else None,
        )
        return cls(
            nats_url=env.get("AUTELLIX_NATS", DEFAULT_NATS_URL),
            root=env.get("AUTELLIX_ROOT", DEFAULT_ROOT),
            engine_id=env.get("AUTELLIX_ENGINE_ID") or _default_engine_id(),
            backend=backend,
            max_batched_tokens=int(env.get("AUTELLIX_MAX_BATCHED_TOKENS", d.max_batched_tokens)),
            heartbeat_s=float(env.get("AUTELLIX_HEARTBEAT_S", d.heartbeat_s)),
            drain_timeout_s=float(env.get("AUTELLIX_DRAIN_TIMEOUT_S", d.drain_timeout_s)),
            policy=env.get("AUTELLIX_POLICY", d.policy),
            schedule_every=int(env.get("AUTELLIX_SCHEDULE_EVERY", d.schedule_every)),
            preempt_mode=env.get("AUTELLIX_PREEMPT_MODE", d.preempt_mode),
            metrics_port=metrics_port_from_env(),
            max_waiting=int(env.get("AUTELLIX_MAX_WAITING", d.max_waiting)),
            step_stuck_s=float(env.get("AUTELLIX_STEP_STUCK_S", d.step_stuck_s)),
        )

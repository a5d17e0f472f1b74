from __future__ import annotations

import os
from dataclasses import dataclass

from autellix.proto import DEFAULT_ROOT
from autellix.services.metrics import metrics_port_from_env
from autellix.services.nats_conn import DEFAULT_NATS_URL


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    nats_url: str = DEFAULT_NATS_URL
    root: str = DEFAULT_ROOT
    #: fcfs | mlfq | plas | atlas
    policy: str = "plas"
    #: largest max_tokens a call may ask for
    max_tokens_ceiling: int = 4096
    #: how long a call waits for a live engine before it fails with ``no_engine``
    no_engine_wait_s: float = 30.0
    #: engine choice: locality | least-used | round-robin
    balancer: str = "locality"
    #: Prometheus metrics on this port (0 = any free one); None = off
    metrics_port: int | None = None
    #: a routed call not finished within this many seconds fails with ``deadline_exceeded``
    call_deadline_s: float = 600.0
    #: calls of one program this scheduler has routed and not seen finish; more get ``rate_limited``
    max_calls_per_program: int = 1024
    #: a tenant's service counts half after this long (policy/tenant_account.py)
    tenant_half_life_s: float = 300.0

    @classmethod
    def from_env(cls) -> SchedulerConfig:
        env = os.environ
        d = cls()
        return cls(
            nats_url=env.get("AUTELLIX_NATS", DEFAULT_NATS_URL),
            root=env.get("AUTELLIX_ROOT", DEFAULT_ROOT),
            policy=env.get("AUTELLIX_POLICY", d.policy),
            max_tokens_ceiling=int(env.get("AUTELLIX_MAX_TOKENS_CEILING", d.max_tokens_ceiling)),
            no_engine_wait_s=float(env.get("AUTELLIX_NO_ENGINE_WAIT_S", d.no_engine_wait_s)),
            balancer=env.get("AUTELLIX_BALANCER", d.balancer),
            metrics_port=metrics_port_from_env(),
            max_calls_per_program=int(env.get("AUTELLIX_MAX_CALLS_PER_PROGRAM", d.max_calls_per_program)),
            call_deadline_s=float(env.get("AUTELLIX_CALL_DEADLINE_S", d.call_deadline_s)),
            tenant_half_life_s=float(env.get("AUTELLIX_TENANT_HALF_LIFE_S", d.tenant_half_life_s)),
        )

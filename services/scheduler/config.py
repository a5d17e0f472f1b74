from __future__ import annotations

import os
from dataclasses import dataclass

from autellix.proto import DEFAULT_ROOT
from autellix.services.metrics import metrics_port_from_env
from autellix.services.nats_conn import DEFAULT_NATS_URL

from .tenant_limits import DEFAULT_MAX_CALLS, DEFAULT_MAX_TOKENS


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
    #: a tenant's calls in flight through this scheduler (routed or waiting for an engine); more
    #: get ``rate_limited`` (services/scheduler/tenant_limits.py); 0 = no bound
    max_calls_per_tenant: int = DEFAULT_MAX_CALLS
    #: a tenant's tokens in flight through this scheduler (estimated prompt + max_tokens per call)
    max_tokens_per_tenant: int = DEFAULT_MAX_TOKENS
    #: users trusted to name their callers' tenants (the request's ``tenant``): the gateway
    tenant_users: tuple[str, ...] = ("gateway",)
    #: the door: a new program's calls wait while the engines' working set does not fit their KV
    door: bool = False
    #: admit while the projected working set stays under this fraction of the engines' KV capacity
    door_high_water: float = 0.9
    #: programs that may wait at the door; one more is refused with ``rate_limited``
    door_max_waiting: int = 1000

    def __post_init__(self) -> None:
        if not 0.0 < self.door_high_water <= 1.0:
            raise ValueError(f"door_high_water must be in (0, 1], got {self.door_high_water}")
        if self.max_calls_per_tenant < 0 or self.max_tokens_per_tenant < 0:
            raise ValueError("max_calls_per_tenant and max_tokens_per_tenant must be >= 0 (0: no bound)")
        if self.door_max_waiting < 1:
            raise ValueError(f"door_max_waiting must be >= 1, got {self.door_max_waiting}")

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
            max_calls_per_tenant=int(env.get("AUTELLIX_MAX_CALLS_PER_TENANT", d.max_calls_per_tenant)),
            max_tokens_per_tenant=int(env.get("AUTELLIX_MAX_TOKENS_PER_TENANT", d.max_tokens_per_tenant)),
            tenant_users=tuple(
                u.strip() for u in env.get("AUTELLIX_TENANT_USERS", ",".join(d.tenant_users)).split(",") if u.strip()
            ),
            door=env.get("AUTELLIX_DOOR", "1" if d.door else "0").lower() in ("1", "true", "yes", "on"),
            door_high_water=float(env.get("AUTELLIX_DOOR_HIGH_WATER", d.door_high_water)),
            door_max_waiting=int(env.get("AUTELLIX_DOOR_MAX_WAITING", d.door_max_waiting)),
        )

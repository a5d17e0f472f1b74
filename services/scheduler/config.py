from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

from autellix.policy.balancer import BALANCER_NAMES
from autellix.policy.door import DEFAULT_SPILL_GATE
from autellix.policy.variants import SERVING_POLICIES
from autellix.services.nats_config import NATS_SETTINGS, NatsConfig
from autellix.services.settings import METRICS_PORT, Setting, from_env, parse_bool, parse_finite, parse_names_list

from .tenant_limits import DEFAULT_MAX_CALLS, DEFAULT_MAX_TOKENS


def parse_spill_gate(text: str) -> float | None:
    """``AUTELLIX_DOOR_SPILL_GATE`` / ``--door-spill-gate``: a share of busy time, or ``none``."""
    if text.strip().lower() in ("none", "off"):
        return None
    return parse_finite(text)


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    nats: NatsConfig = field(default_factory=NatsConfig)
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
    #: (on by default: with the spill gate it never cost latency or capacity in the simulator's
    #: capacity searches, and gained up to 16% over the CPU tier alone; bench/SIM_RESULTS.md)
    door: bool = True
    #: admit while the projected working set stays under this fraction of the engines' KV capacity
    door_high_water: float = 0.9
    #: programs that may wait at the door; one more is refused with ``rate_limited``
    door_max_waiting: int = 1000
    #: with CPU tiers on the engines, the door holds programs only while the engines spend at least
    #: this share of their busy time swapping contexts back in from them (None: always)
    door_spill_gate: float | None = DEFAULT_SPILL_GATE

    SETTINGS: ClassVar[tuple[Setting, ...]] = (
        *NATS_SETTINGS,
        Setting("policy", "AUTELLIX_POLICY", "--policy", str, "scheduling policy", choices=SERVING_POLICIES),
        Setting("balancer", "AUTELLIX_BALANCER", "--balancer", str, "engine choice", choices=BALANCER_NAMES),
        Setting("max_tokens_ceiling", "AUTELLIX_MAX_TOKENS_CEILING", "--max-tokens-ceiling", int,
                "largest `max_tokens` a call may ask for"),
        Setting("no_engine_wait_s", "AUTELLIX_NO_ENGINE_WAIT_S", "--no-engine-wait-s", parse_finite,
                "how long a call waits for a live engine before it fails with `no_engine`"),
        Setting("call_deadline_s", "AUTELLIX_CALL_DEADLINE_S", "--call-deadline-s", parse_finite,
                "a routed call not finished by then fails with `deadline_exceeded`"),
        Setting("max_calls_per_program", "AUTELLIX_MAX_CALLS_PER_PROGRAM", "--max-calls-per-program", int,
                "calls of one program in flight (per scheduler); more get `rate_limited`"),
        Setting("tenant_half_life_s", "AUTELLIX_TENANT_HALF_LIFE_S", "--tenant-half-life-s", parse_finite,
                "a tenant's recent service counts half after this long"),
        Setting("max_calls_per_tenant", "AUTELLIX_MAX_CALLS_PER_TENANT", "--max-calls-per-tenant", int,
                "calls of one tenant in flight, routed or waiting for an engine (per scheduler); more get "
                "`rate_limited`; 0 = no bound"),
        Setting("max_tokens_per_tenant", "AUTELLIX_MAX_TOKENS_PER_TENANT", "--max-tokens-per-tenant", int,
                "estimated prompt + `max_tokens` of one tenant's calls in flight (per scheduler); more get "
                "`rate_limited`; 0 = no bound"),
        Setting("tenant_users", "AUTELLIX_TENANT_USERS", "--tenant-users", parse_names_list,
                "identities trusted to name their callers' tenant (comma-separated)", default_text="`gateway`"),
        Setting("door", "AUTELLIX_DOOR", "--door", parse_bool,
                "new programs wait while the engines' working set does not fit their KV", boolean=True),
        Setting("door_high_water", "AUTELLIX_DOOR_HIGH_WATER", "--door-high-water", parse_finite,
                "admit while the projected working set stays under this fraction of KV"),
        Setting("door_max_waiting", "AUTELLIX_DOOR_MAX_WAITING", "--door-max-waiting", int,
                "programs that may wait at the door (`rate_limited` beyond)"),
        Setting("door_spill_gate", "AUTELLIX_DOOR_SPILL_GATE", "--door-spill-gate", parse_spill_gate,
                "with CPU tiers on the engines, the door holds programs only while the engines spend this share "
                "of busy time swapping contexts back in; `none`: always"),
        METRICS_PORT,
    )

    def __post_init__(self) -> None:
        if not 0.0 < self.door_high_water <= 1.0:
            raise ValueError(f"door_high_water must be in (0, 1], got {self.door_high_water}")
        if self.max_calls_per_tenant < 0 or self.max_tokens_per_tenant < 0:
            raise ValueError("max_calls_per_tenant and max_tokens_per_tenant must be >= 0 (0: no bound)")
        if self.door_max_waiting < 1:
            raise ValueError(f"door_max_waiting must be >= 1, got {self.door_max_waiting}")
        if self.door_spill_gate is not None and not 0.0 <= self.door_spill_gate < 1.0:
            raise ValueError(f"door_spill_gate must be in [0, 1), got {self.door_spill_gate}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> SchedulerConfig:
        return from_env(cls, env)

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

from autellix.services.nats_config import NATS_SETTINGS, NatsConfig
from autellix.services.settings import METRICS_PORT, Setting, from_env, parse_bool, parse_finite


@dataclass(frozen=True, slots=True)
class TrackerConfig:
    nats: NatsConfig = field(default_factory=NatsConfig)
    #: programs idle this long (no active call) are forgotten
    idle_ttl_s: float = 600.0
    gc_interval_s: float = 5.0
    #: keep the process table in a JetStream key-value bucket (falls back to memory without JetStream)
    persist: bool = True
    #: changed programs are written to the bucket within this interval
    flush_interval_s: float = 0.02
    #: Prometheus metrics on this port (0 = any free one); None = off
    metrics_port: int | None = None
    #: JetStream replicas of the process-table bucket and the completions stream (3 on a 3-node cluster)
    kv_replicas: int = 1
    #: an active call with no completed event after this long is dropped (its engine died, or its
    #: event was lost); longer than the schedulers' call deadline
    active_call_max_s: float = 900.0
    #: trackers sharing the programs (each owns the programs whose slot % shards == its index)
    shards: int = 1
    #: this tracker's shard, 0 .. shards - 1 (replicas of one shard share its work)
    shard_index: int = 0

    SETTINGS: ClassVar[tuple[Setting, ...]] = (
        *NATS_SETTINGS,
        Setting("idle_ttl_s", "AUTELLIX_PROGRAM_TTL_S", "--program-ttl", parse_finite,
                "forget a program idle (no active call) this many seconds"),
        Setting("gc_interval_s", "AUTELLIX_TRACKER_GC_S", "--tracker-gc-s", parse_finite,
                "how often idle programs are looked for, in seconds"),
        Setting("persist", "AUTELLIX_TRACKER_PERSIST", "--tracker-persist", parse_bool,
                "keep the process table in a JetStream key-value bucket", boolean=True),
        Setting("active_call_max_s", "AUTELLIX_ACTIVE_CALL_MAX_S", "--active-call-max-s", parse_finite,
                "an active call with no completion after this many seconds stops counting"),
        Setting("kv_replicas", "AUTELLIX_KV_REPLICAS", "--kv-replicas", int,
                "JetStream replicas of the process-table bucket and the completions stream"),
        Setting("shards", "AUTELLIX_TRACKER_SHARDS", "--shards", int,
                "trackers sharing the programs (`autellix up --trackers N`); see [docs/scaling.md](docs/scaling.md)"),
        Setting("shard_index", "AUTELLIX_TRACKER_SHARD", "--shard-index", int,
                "this tracker's shard, 0 .. shards-1 (replicas of one shard share its work)"),
        METRICS_PORT,
    )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> TrackerConfig:
        return from_env(cls, env)

from __future__ import annotations

import os
from dataclasses import dataclass

from autellix.proto import DEFAULT_ROOT
from autellix.services.metrics import metrics_port_from_env
from autellix.services.nats_conn import DEFAULT_NATS_URL


@dataclass(frozen=True, slots=True)
class TrackerConfig:
    nats_url: str = DEFAULT_NATS_URL
    root: str = DEFAULT_ROOT
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

    @classmethod
    def from_env(cls) -> TrackerConfig:
        env = os.environ
        d = cls()
        return cls(
            nats_url=env.get("AUTELLIX_NATS", DEFAULT_NATS_URL),
            root=env.get("AUTELLIX_ROOT", DEFAULT_ROOT),
            idle_ttl_s=float(env.get("AUTELLIX_PROGRAM_TTL_S", d.idle_ttl_s)),
            gc_interval_s=float(env.get("AUTELLIX_TRACKER_GC_S", d.gc_interval_s)),
            active_call_max_s=float(env.get("AUTELLIX_ACTIVE_CALL_MAX_S", d.active_call_max_s)),
            persist=env.get("AUTELLIX_TRACKER_PERSIST", "1").lower() not in ("0", "false", "no"),
            metrics_port=metrics_port_from_env(),
            kv_replicas=int(env.get("AUTELLIX_KV_REPLICAS", d.kv_replicas)),
            shards=int(env.get("AUTELLIX_TRACKER_SHARDS", d.shards)),
            shard_index=int(env.get("AUTELLIX_TRACKER_SHARD", d.shard_index)),
        )

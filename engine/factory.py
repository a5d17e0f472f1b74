"""Build a backend by name. Heavy imports (torch, transformers, vllm) happen only when needed."""

from __future__ import annotations

from dataclasses import dataclass

from .backend import ModelBackend
from .cost_model import profile

BACKENDS = ("hf", "sim", "vllm")
#: how retained KV (finished calls' contexts) is evicted: least recently used, or program-aware
#: (contained entries, then ended programs', then LRU: :mod:`autellix.policy.retention`)
RETENTIONS = ("lru", "program")
#: the CPU tier's default size, in multiples of the engine's KV capacity
DEFAULT_TIER_SCALE = 4


@dataclass(frozen=True, slots=True)
class BackendSpec:
    name: str = "hf"
    #: a local Hugging Face model directory; None = the default SmolLM2-135M-Instruct
    model: str | None = None
    device: str = "cpu"
    max_batch: int = 32
    kv_capacity_tokens: int = 65_536
    swap_pool_bytes: int = 1 << 30
    threads: int | None = None
    #: sim backend: cost profile and the factor on modelled time (0 = instantaneous)
    sim_profile: str = "llama31-8b-h100"
    sim_time_scale: float = 1.0
    #: retained KV's eviction order: lru | program
    retention: str = "program"
    #: CPU tier for evicted contexts of live programs, in tokens; None = DEFAULT_TIER_SCALE x the KV
    #: capacity; 0 = no tier
    kv_tier_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.retention not in RETENTIONS:
            raise ValueError(f"retention must be one of {', '.join(RETENTIONS)}, got {self.retention!r}")
        if self.kv_tier_tokens is not None and self.kv_tier_tokens < 0:
            raise ValueError(f"kv_tier_tokens must be >= 0, got {self.kv_tier_tokens}")

    @property
    def tier_tokens(self) -> int:
        """The CPU tier's size in tokens (the default resolved)."""
        if self.kv_tier_tokens is None:
            return DEFAULT_TIER_SCALE * self.kv_capacity_tokens
        return self.kv_tier_tokens


def make_backend(spec: BackendSpec) -> ModelBackend:
    if spec.name == "sim":
        from .sim_backend import SimBackend

        return SimBackend(
            profile(spec.sim_profile),
            time_scale=spec.sim_time_scale,
            kv_capacity_tokens=spec.kv_capacity_tokens,
            retention=spec.retention,  # type: ignore[arg-type]
            tier_tokens=spec.tier_tokens,
        )
    if spec.name == "hf":
        from .hf_backend import HFBackend
        from .model_store import resolve_model

        return HFBackend(
            resolve_model(spec.model),
            device=spec.device,
            max_batch=spec.max_batch,
            kv_capacity_tokens=spec.kv_capacity_tokens,
            swap_pool_bytes=spec.swap_pool_bytes,
            threads=spec.threads,
            retention=spec.retention,
            cpu_tier_tokens=spec.kv_tier_tokens,  # None: the backend's default, bounded by the machine's memory
        )
    if spec.name == "vllm":
        from .model_store import resolve_model
        from .vllm_backend import VLLMBackend

        return VLLMBackend(str(resolve_model(spec.model)))
    raise ValueError(f"unknown backend {spec.name!r}; expected one of {', '.join(BACKENDS)}")

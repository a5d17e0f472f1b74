"""Build a backend by name. Heavy imports (torch, transformers, vllm) happen only when needed."""

from __future__ import annotations

from dataclasses import dataclass

from .backend import ModelBackend
from .cost_model import profile

BACKENDS = ("hf", "sim", "vllm")


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


def make_backend(spec: BackendSpec) -> ModelBackend:
    if spec.name == "sim":
        from .sim_backend import SimBackend

        return SimBackend(profile(spec.sim_profile), time_scale=spec.sim_time_scale)
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
        )
    if spec.name == "vllm":
        from .model_store import resolve_model
        from .vllm_backend import VLLMBackend

        return VLLMBackend(str(resolve_model(spec.model)))
    raise ValueError(f"unknown backend {spec.name!r}; expected one of {', '.join(BACKENDS)}")

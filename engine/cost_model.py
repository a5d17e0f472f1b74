"""Step-time cost model shared by the simulator (``sim/``) and the ``sim`` engine backend.

A batched forward step's time is modelled as

    t = base_s + prefill_s_per_token * prefill_tokens
               + decode_s_per_seq * decode_seqs
               + kv_read_s_per_token * context_tokens

where ``context_tokens`` is the KV the step's attention reads (sum of every scheduled sequence's
context). Swapping a sequence's KV to CPU and back costs ``swap_s_per_token`` per token each way.

The default profile, :func:`llama31_8b_h100`, resembles Llama-3.1-8B in bf16 on one 80 GB H100:

- weights 16 GB read once per step at ~3.35 TB/s HBM: ~5 ms; with launch overheads ``base_s`` 7 ms;
- prefill is compute bound: 2 x 8e9 FLOP per token at ~40% of 989 TFLOP/s dense bf16: ~40 us/token;
- decode adds the same FLOPs per sequence but runs at lower efficiency: ~30 us per sequence;
- KV is 128 KiB per token (32 layers x 8 KV heads x 128 dims x 2 (K,V) x 2 bytes): reading it at
  3.35 TB/s costs ~39 ns per context token per step;
- KV capacity: (80 GB x 0.9 - 16 GB weights - ~4 GB activations) / 128 KiB ~ 400k tokens;
- swap over PCIe Gen5 at ~25 GB/s effective: 128 KiB / 25 GB/s ~ 5.2 us per token each way;
- vLLM-like limits: at most 256 running sequences, 8192 batched tokens per step (chunked prefill).

These are first-principles estimates from public hardware specifications, not measurements.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class CostModel:
    name: str = "llama31-8b-h100"
    base_s: float = 7e-3
    prefill_s_per_token: float = 40e-6
    decode_s_per_seq: float = 30e-6
    kv_read_s_per_token: float = 39e-9
    swap_s_per_token: float = 5.2e-6
    kv_capacity_tokens: int = 400_000
    max_batch: int = 256
    max_batched_tokens: int = 8192
    max_context: int = 131_072
    kv_bytes_per_token: int = 131_072

    def step_time(self, prefill_tokens: int, decode_seqs: int, context_tokens: int) -> float:
        if prefill_tokens == 0 and decode_seqs == 0:
            return 0.0
        return (
            self.base_s
            + self.prefill_s_per_token * prefill_tokens
            + self.decode_s_per_seq * decode_seqs
            + self.kv_read_s_per_token * context_tokens
        )

    def swap_time(self, tokens: int) -> float:
        """One direction (out or in) for a sequence holding ``tokens`` of KV."""
        return self.swap_s_per_token * tokens

    def recompute_time(self, tokens: int) -> float:
        """Re-prefilling ``tokens`` (the marginal cost inside a step)."""
        return self.prefill_s_per_token * tokens


def llama31_8b_h100() -> CostModel:
    return CostModel()


PROFILES = {"llama31-8b-h100": llama31_8b_h100}


def profile(name: str) -> CostModel:
    try:
        return PROFILES[name]()
    except KeyError:
        raise ValueError(f"unknown cost profile {name!r}; known: {', '.join(sorted(PROFILES))}") from None

"""The ``hf`` backend: torch + transformers weights, our own batched step loop, per-sequence KV slots.

:class:`HFBackend` is the facade the engine core talks to (:class:`engine.backend.ModelBackend`); the
work lives in three parts, each in a file of its own:

- ``engine/hf_model.py`` (:class:`LlamaStep`): the weights and one ragged, batched forward pass;
- ``engine/hf_kv.py`` (:class:`KVStore`): KV slabs of sequence slots, the preemption swap pool;
- ``engine/hf_prefix_cache.py`` (:class:`RetainedKV`): the prefix cache (finished sequences' KV
  matched by content through ``engine/hf_prefix_tree.py``) and its CPU tier;
- ``engine/sampling.py`` (:class:`Sampler`): greedy or seeded sampling.

Preemption: :meth:`swap_out` gathers all of a sequence's KV (every layer, K and V) into one
contiguous region of a preallocated swap pool with one copy (pinned memory and ``non_blocking`` on
CUDA); :meth:`swap_in` copies it back into a free slot. :meth:`drop` forgets the KV; the next
``run`` for that sequence must start again at position 0.
"""

from __future__ import annotations

import copy
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .backend import CacheStats, StepBatch, StepOutput, SwapStats
from .hf_kv import KVCapacityError, KVStore, SequenceStateError, SwapPoolFullError
from .hf_model import SUPPORTED_MODEL_TYPES, LlamaStep, Plan
from .hf_prefix_cache import RetainedKV, default_tier_tokens
from .sampling import Sampler

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "HFBackend",
    "KVCapacityError",
    "SequenceStateError",
    "SwapPoolFullError",
]


def _default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


class HFBackend:
    """Llama-family model execution with continuous batching, KV swap and recompute.

    Args:
        model_dir: a local Hugging Face model directory (see :func:`engine.model_store.resolve_model`).
        device: ``"cpu"`` or a CUDA device.
        dtype: weights, activations and KV; default float32 on CPU, bfloat16 on CUDA.
        max_batch: most sequences one step may carry (also the initial slot count of a slab).
        kv_capacity_tokens: most KV tokens resident on the device at once (all sequences together).
        swap_pool_bytes: size of the preallocated CPU swap pool.
        threads: torch intra-op threads; None leaves torch's default (one per physical core).
        prefix_cache: keep finished sequences' KV and reuse it by content (:class:`PrefixCache`).
        cpu_tier_tokens: the prefix cache's CPU tier (evicted live contexts), in tokens; None = four
            times ``kv_capacity_tokens``, at most an eighth of physical memory (:func:`default_tier_tokens`);
            0 = no tier.
        retention: eviction order of retained contexts: ``program`` (contained entries, then ended
            programs', then least recently used) or ``lru``.
    """

    name = "hf"

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        device: str = "cpu",
        dtype: torch.dtype | str | None = None,
        max_batch: int = 32,
        kv_capacity_tokens: int = 65_536,
        swap_pool_bytes: int = 1 << 30,
        threads: int | None = None,
        prefix_cache: bool = True,
        cpu_tier_tokens: int | None = None,
        retention: str = "program",
    ) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads is not None:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        resolved_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.dtype: torch.dtype = resolved_dtype or _default_dtype(self.device)
        path = Path(model_dir)
        started = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype)
        self._init_from_model(model, tokenizer, path.name)
        self._init_state(max_batch, kv_capacity_tokens, swap_pool_bytes, prefix_cache, cpu_tier_tokens, retention)
        self.load_s = time.perf_counter() - started

    @classmethod
    def from_model(
        cls,
        model: Any,
        tokenizer: Any,
        *,
        model_name: str = "in-memory",
        device: str = "cpu",
        max_batch: int = 32,
        kv_capacity_tokens: int = 65_536,
        swap_pool_bytes: int = 1 << 30,
        prefix_cache: bool = True,
        cpu_tier_tokens: int | None = None,
        retention: str = "program",
    ) -> HFBackend:
        """Wrap an already loaded transformers model (e.g. random weights for a benchmark)."""
        self = cls.__new__(cls)
        self.device = torch.device(device)
        self.dtype = next(model.parameters()).dtype
        self._init_from_model(model, tokenizer, model_name)
        self._init_state(max_batch, kv_capacity_tokens, swap_pool_bytes, prefix_cache, cpu_tier_tokens, retention)
        self.load_s = 0.0
        return self

    def fork(
        self,
        *,
        max_batch: int | None = None,
        kv_capacity_tokens: int | None = None,
        swap_pool_bytes: int | None = None,
        prefix_cache: bool | None = None,
        cpu_tier_tokens: int | None = None,
        retention: str | None = None,
    ) -> HFBackend:
        """A backend that shares this one's weights and tokenizer but has its own KV, swap pool and cache."""
        other = copy.copy(self)  # shares weights, tokenizer and model facts
        kv_tokens = self.kv_capacity_tokens if kv_capacity_tokens is None else kv_capacity_tokens
        if cpu_tier_tokens is None and kv_tokens == self.kv_capacity_tokens:
            cpu_tier_tokens = self.cpu_tier_tokens  # else the default for the new KV capacity
        other._init_state(
            self.max_batch if max_batch is None else max_batch,
            kv_tokens,
            self.swap_pool_capacity_bytes if swap_pool_bytes is None else swap_pool_bytes,
            self.cache.enabled if prefix_cache is None else prefix_cache,
            cpu_tier_tokens,
            self.retention if retention is None else retention,
        )
        return other

    # ------------------------------------------------------------------ setup

    def _init_from_model(self, model: Any, tokenizer: Any, model_name: str) -> None:
        self.model = LlamaStep(model, model_name, self.device, self.dtype)
        self.model_name = model_name
        self.tokenizer = tokenizer
        self.max_context = self.model.max_context
        self.eos_token_ids = self._eos_ids(model, tokenizer)
        del model

    def _init_state(
        self,
        max_batch: int,
        kv_capacity_tokens: int,
        swap_pool_bytes: int,
        prefix_cache: bool = True,
        cpu_tier_tokens: int | None = None,
        retention: str = "program",
    ) -> None:
        self.max_batch = max_batch
        self.kv_capacity_tokens = kv_capacity_tokens
        self.swap_pool_capacity_bytes = swap_pool_bytes
        m = self.model
        self.kv = KVStore(
            num_layers=m.num_layers,
            num_kv_heads=m.num_kv_heads,
            head_dim=m.head_dim,
            max_context=m.max_context,
            max_batch=max_batch,
            kv_capacity_tokens=kv_capacity_tokens,
            swap_pool_bytes=swap_pool_bytes,
            dtype=self.dtype,
            device=self.device,
        )
        if cpu_tier_tokens is None:
            cpu_tier_tokens = default_tier_tokens(kv_capacity_tokens, self.kv.bytes_per_token())
        self.cpu_tier_tokens = cpu_tier_tokens if prefix_cache else 0
        self.retention = retention
        self.cache = RetainedKV(self.kv, enabled=prefix_cache, tier_tokens=self.cpu_tier_tokens, retention=retention)
        self.sampler = Sampler(self.device)
        self._lock = threading.Lock()

    @staticmethod
    def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
        ids: set[int] = set()
        gen = getattr(model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None) if gen is not None else None
        if eos is None:
            eos = getattr(model.config, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif eos is not None:
            ids.update(int(e) for e in eos)
        if getattr(tokenizer, "eos_token_id", None) is not None:
            ids.add(int(tokenizer.eos_token_id))
        return frozenset(ids)

    # ------------------------------------------------------------------ tokens

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """The model's chat template with the assistant turn opened (``add_generation_prompt``)."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"model {self.model_name!r} has no chat template; send a plain prompt instead")
        text = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def encode_prompt(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt).input_ids)

    def decode(self, token_ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(token_ids), skip_special_tokens=True))

    # ------------------------------------------------------------------ KV bookkeeping

    def kv_bytes_per_token(self) -> int:
        return self.kv.bytes_per_token()

    def kv_tokens_used(self) -> int:
        """KV tokens the sequences (running calls) hold on the device."""
        return self.kv.resident_tokens

    def kv_tokens_capacity(self) -> int:
        return self.kv_capacity_tokens

    def swap_pool_bytes_used(self) -> int:
        return self.kv.pool.used * self.kv.pool.itemsize

    def kv_slab_bytes(self) -> int:
        """Device memory the KV slabs occupy now (capacity rounding and free slots included)."""
        return self.kv.slab_bytes()

    def can_swap_out(self, seq_id: str) -> bool:
        return self.kv.can_swap_out(seq_id)

    def seq_length(self, seq_id: str) -> int:
        """Tokens in the sequence's KV (resident or swapped); 0 for an unknown or dropped sequence."""
        seq = self.kv.seqs.get(seq_id)
        return seq.length if seq is not None else 0

    def is_swapped(self, seq_id: str) -> bool:
        seq = self.kv.seqs.get(seq_id)
        return seq is not None and seq.swapped is not None

    # ------------------------------------------------------------------ prefix cache (PrefixCache)

    def attach_prefix(self, seq_id: str, token_ids: Sequence[int], prefix_key: str | None) -> int:
        with self._lock, torch.inference_mode():
            return self.cache.attach(seq_id, token_ids, prefix_key)

    def end_prefix(self, prefix_key: str) -> None:
        with self._lock:
            self.cache.end_program(prefix_key)

    def cache_stats(self) -> CacheStats:
        with self._lock:
            return self.cache.cache_stats()

    def kv_tokens_retained(self) -> int:
        """KV tokens of finished sequences kept on the device for the prefix cache."""
        return self.cache.device_tokens()

    # ------------------------------------------------------------------ lifecycle

    def release(self, seq_id: str) -> None:
        """The call finished: its KV stays as a prefix-cache entry of its program (when enabled)."""
        with self._lock, torch.inference_mode():
            self.sampler.forget(seq_id)
            seq = self.kv.seqs.pop(seq_id, None)
            if seq is None:
                return
            if seq.swapped is not None:
                self.kv.pool.release(seq.swapped.offset, self.kv.region_elems(seq.swapped.length))
                seq.swapped = None
            self.cache.retain(seq)

    def drop(self, seq_id: str) -> None:
        """Discard the KV (resident or swapped); the sampler's random state is kept."""
        with self._lock:
            self.kv.forget(seq_id)

    def swap_out(self, seq_id: str) -> SwapStats:
        with self._lock, torch.inference_mode():
            started = time.perf_counter()
            moved = self.kv.swap_out(seq_id)
            return SwapStats(bytes=moved, elapsed_s=time.perf_counter() - started)

    def swap_in(self, seq_id: str) -> SwapStats:
        with self._lock, torch.inference_mode():
            seq = self.kv.require(seq_id)
            if seq.swapped is None:
                raise SequenceStateError(f"sequence {seq_id!r} is not swapped out")
            n = seq.swapped.length
            if self.kv.resident_tokens + n > self.kv_capacity_tokens:
                raise KVCapacityError(
                    f"swap-in of {n} tokens exceeds the KV capacity ({self.kv.resident_tokens} of "
                    f"{self.kv_capacity_tokens} in use)"
                )
            started = time.perf_counter()
            self.cache.make_room(n + 1)
            moved = self.kv.swap_in(seq_id)
            return SwapStats(bytes=moved, elapsed_s=time.perf_counter() - started)

    # ------------------------------------------------------------------ the step

    def run(self, batch: StepBatch) -> StepOutput:
        """Append each sequence's tokens to its KV and sample where asked (see :class:`SeqWork`).

        Raises :class:`SequenceStateError` (bad ``start_pos``, swapped-out or unknown sequence),
        :class:`KVCapacityError` or ``ValueError`` before touching any state; if the forward pass
        itself fails, every sequence's KV length is rolled back to what it was before the call.
        """
        started = time.perf_counter()
        if not batch.work:
            return StepOutput(next_tokens={}, elapsed_s=0.0)
        with self._lock, torch.inference_mode():
            growth = self._validate(batch)
            self.cache.make_room(growth)
            # positions before start_pos are never written by this step: safe to roll back to
            seqs = self.kv.seqs
            before = {w.seq_id: w.start_pos if w.seq_id in seqs else None for w in batch.work}
            try:
                # place every sequence (slabs may move or grow here, before any tensor views are taken)
                for w in batch.work:
                    self.kv.extend(w.seq_id, w.start_pos, w.token_ids, w.prefix_key)
                plan = self.model.plan(batch.work, seqs)
                logits = self._forward(plan)
                next_tokens = self.sampler.sample(plan.sample_work, logits)
            except BaseException:
                self.kv.roll_back(before)
                raise
        prefill_tokens = sum(p.rows for p in plan.prefill)
        return StepOutput(
            next_tokens=next_tokens,
            elapsed_s=time.perf_counter() - started,
            extra={
                "tokens": float(plan.token_ids.numel()),
                "prefill_tokens": float(prefill_tokens),
                "decode_seqs": float(sum(g.rows for g in plan.decode)),
                "context_tokens": float(sum(w.start_pos + len(w.token_ids) for w in batch.work)),
            },
        )

    def _forward(self, plan: Plan) -> torch.Tensor | None:
        return self.model.forward(plan)

    def _validate(self, batch: StepBatch) -> int:
        """Check the step against every sequence's state and the KV capacity; returns the KV growth."""
        work = batch.work
        if len(work) > self.max_batch:
            raise ValueError(f"step carries {len(work)} sequences; max_batch is {self.max_batch}")
        seen: set[str] = set()
        growth = 0
        for w in work:
            if w.seq_id in seen:
                raise ValueError(f"sequence {w.seq_id!r} appears twice in one step")
            seen.add(w.seq_id)
            if not w.token_ids:
                raise ValueError(f"sequence {w.seq_id!r}: empty token_ids")
            seq = self.kv.seqs.get(w.seq_id)
            have = 0 if seq is None else seq.length
            if seq is not None and seq.swapped is not None:
                raise SequenceStateError(f"sequence {w.seq_id!r} is swapped out; swap_in before run")
            if w.start_pos < 0 or w.start_pos > have:
                raise SequenceStateError(f"sequence {w.seq_id!r}: start_pos {w.start_pos} but {have} tokens are cached")
            end = w.start_pos + len(w.token_ids)
            if end > self.max_context:
                raise SequenceStateError(
                    f"sequence {w.seq_id!r}: {end} tokens exceed the model's context of {self.max_context}"
                )
            growth += end - have
        if self.kv.resident_tokens + growth > self.kv_capacity_tokens:
            raise KVCapacityError(
                f"step needs {growth} more KV tokens; {self.kv.resident_tokens} of {self.kv_capacity_tokens} in use"
            )
        return growth

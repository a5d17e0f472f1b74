"""The ``hf`` backend: torch + transformers weights, our own batched step loop, per-sequence KV slots.

transformers loads the model (any local Hugging Face directory of a Llama-family architecture); we
take its modules' weights and run our own forward pass, because ``model.forward`` handles one padded
rectangle per call while a continuous-batching step is *ragged*: some sequences prefill a chunk of a
prompt, most decode one token, each at its own position.

One step (:meth:`HFBackend.run`):

- every sequence's new tokens are flattened into one ``[N, hidden]`` batch, so each linear layer
  (fused q|k|v, o, fused gate|up, down) runs **once per layer per step**;
- the KV cache is a set of *slabs*: slab ``c`` holds sequences of up to ``capacity_c`` tokens
  (powers of two) in slots of one tensor ``[layers, 2 (K,V), slots, kv_heads, capacity_c, head_dim]``;
  a sequence that outgrows its slab moves to the next one (amortised doubling), an empty slab is
  freed, a full one doubles its slot count;
- decoding sequences (one new token) attend in **one SDPA call per slab per layer**: the query heads
  that share a KV head are folded into the query-length axis (GQA without copying K/V) and a length
  mask hides each slot's unused tail;
- prefill chunks attend one sequence at a time with a causal mask offset by the tokens already
  cached;
- the final norm and ``lm_head`` run only on the rows that sample, ``lm_head`` in row chunks (faster
  on CPU than one tall GEMM, bit-identical).

The arithmetic mirrors ``transformers``' Llama modules operation for operation (RMSNorm in float32,
rotate-half RoPE from the model's own rotary module, SDPA with the same scale), so greedy decoding
reproduces ``model.generate(do_sample=False)``.

Preemption: :meth:`swap_out` gathers all of a sequence's KV (every layer, K and V) into one
contiguous region of a preallocated swap pool with one copy (pinned memory and ``non_blocking`` on
CUDA); :meth:`swap_in` copies it back into a free slot. :meth:`drop` forgets the KV; the next
``run`` for that sequence must start again at position 0.
"""

from __future__ import annotations

import bisect
import copy
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .backend import SeqWork, StepBatch, StepOutput, SwapStats

#: Architectures whose decoder layer is exactly Llama's (pre-norm RMSNorm, RoPE, GQA, SwiGLU MLP).
SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2"})
#: Smallest KV slab capacity in tokens; slabs double from here up to ``max_context``.
MIN_SLAB_TOKENS = 256
#: Rows of ``lm_head`` per GEMM (tall-skinny GEMMs are slower on CPU than a few medium ones).
LM_HEAD_CHUNK_ROWS = 2048
#: Initial size of a new KV slab (it doubles its slot count when full).
INITIAL_SLAB_BYTES = 256 << 20


class KVCapacityError(MemoryError):
    """A step or a swap-in would hold more KV tokens than ``kv_capacity_tokens``."""


class SwapPoolFullError(MemoryError):
    """The CPU swap pool has no contiguous room for the sequence: drop it (recompute) instead."""


class SequenceStateError(RuntimeError):
    """The engine asked for something the sequence's state does not allow (e.g. running it swapped)."""


@dataclass(slots=True)
class _Weights:
    embed: torch.Tensor
    final_norm: torch.Tensor
    lm_head_chunks: list[torch.Tensor]
    input_norm: list[torch.Tensor]
    post_norm: list[torch.Tensor]
    qkv: list[torch.Tensor]
    qkv_bias: list[torch.Tensor | None]
    o: list[torch.Tensor]
    o_bias: list[torch.Tensor | None]
    gate_up: list[torch.Tensor]
    down: list[torch.Tensor]
    cos: torch.Tensor  # [max_context, head_dim]
    sin_signed: torch.Tensor  # sin with the first half negated (see the RoPE step)


class _Slab:
    """KV slots for sequences of up to ``capacity`` tokens."""

    __slots__ = ("capacity", "free", "kv", "shape_tail")

    def __init__(
        self, capacity: int, shape_tail: tuple[int, int, int, int], slots: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.capacity = capacity
        self.shape_tail = shape_tail  # (layers, 2, kv_heads, head_dim)
        layers, two, kvh, hd = shape_tail
        self.kv = torch.zeros((layers, two, slots, kvh, capacity, hd), dtype=dtype, device=device)
        self.free: list[int] = list(range(slots))  # kept sorted: lowest slot first keeps slabs dense

    @property
    def slots(self) -> int:
        return self.kv.shape[2]

    @property
    def used(self) -> int:
        return self.slots - len(self.free)

    def allocate(self) -> int:
        if not self.free:
            old = self.kv
            n = old.shape[2]
            new = torch.zeros((*old.shape[:2], n * 2, *old.shape[3:]), dtype=old.dtype, device=old.device)
            new[:, :, :n].copy_(old)
            self.kv = new
            self.free = list(range(n, 2 * n))
        return self.free.pop(0)

    def release(self, slot: int) -> None:
        bisect.insort(self.free, slot)


@dataclass(slots=True)
class _SwapRegion:
    offset: int  # in elements of the pool
    length: int  # tokens


@dataclass(slots=True)
class _Seq:
    length: int = 0
    slab: _Slab | None = None
    slot: int = -1
    swapped: _SwapRegion | None = None


class _SwapPool:
    """A preallocated flat buffer with a first-fit allocator of contiguous regions."""

    def __init__(self, capacity_bytes: int, dtype: torch.dtype, pin: bool) -> None:
        self.itemsize = torch.empty((), dtype=dtype).element_size()
        self.capacity = max(0, capacity_bytes // self.itemsize)
        self.buffer = torch.empty(self.capacity, dtype=dtype, pin_memory=pin)
        self._free: list[tuple[int, int]] = [(0, self.capacity)] if self.capacity else []  # (offset, size)
        self.used = 0

    def allocate(self, size: int) -> int | None:
        if size == 0:
            return 0
        for i, (off, avail) in enumerate(self._free):
            if avail >= size:
                if avail == size:
                    del self._free[i]
                else:
                    self._free[i] = (off + size, avail - size)
                self.used += size
                return off
        return None

    def fits(self, size: int) -> bool:
        return size == 0 or any(avail >= size for _, avail in self._free)

    def release(self, offset: int, size: int) -> None:
        if size == 0:
            return
        self.used -= size
        i = bisect.bisect_left(self._free, (offset, 0))
        self._free.insert(i, (offset, size))
        # merge with the next, then with the previous neighbour
        if i + 1 < len(self._free) and offset + size == self._free[i + 1][0]:
            self._free[i] = (offset, size + self._free[i + 1][1])
            del self._free[i + 1]
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == offset:
            self._free[i - 1] = (self._free[i - 1][0], self._free[i - 1][1] + self._free[i][1])
            del self._free[i]


@dataclass(slots=True)
class _DecodeGroup:
    slab: _Slab
    row_start: int
    rows: int
    slots: torch.Tensor  # [B] slot per row
    positions: torch.Tensor  # [B] write position per row
    span: int  # slots [0:span) take part in the SDPA call
    scatter: bool  # rows are not exactly slots 0..span-1 in order
    keys: int  # longest context in the group (SDPA key length)
    mask: torch.Tensor  # [span, 1, 1, keys] bool


@dataclass(slots=True)
class _PrefillItem:
    slab: _Slab
    slot: int
    row_start: int
    rows: int
    start: int
    mask: torch.Tensor | None  # [rows, start+rows] bool, None = plain causal (start == 0)


@dataclass(slots=True)
class _Plan:
    token_ids: torch.Tensor
    positions: torch.Tensor
    decode: list[_DecodeGroup] = field(default_factory=list)
    prefill: list[_PrefillItem] = field(default_factory=list)
    sample_rows: list[int] = field(default_factory=list)
    sample_work: list[SeqWork] = field(default_factory=list)


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
        self._init_from_model(model, tokenizer, path.name, max_batch, kv_capacity_tokens, swap_pool_bytes)
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
    ) -> HFBackend:
        """Wrap an already loaded transformers model (e.g. random weights for a benchmark)."""
        self = cls.__new__(cls)
        self.device = torch.device(device)
        self.dtype = next(model.parameters()).dtype
        self._init_from_model(model, tokenizer, model_name, max_batch, kv_capacity_tokens, swap_pool_bytes)
        self.load_s = 0.0
        return self

    def fork(
        self,
        *,
        max_batch: int | None = None,
        kv_capacity_tokens: int | None = None,
        swap_pool_bytes: int | None = None,
    ) -> HFBackend:
        """A backend that shares this one's weights and tokenizer but has its own KV and swap pool."""
        other = copy.copy(self)  # shares weights, tokenizer and model facts
        other._init_state(
            self.max_batch if max_batch is None else max_batch,
            self.kv_capacity_tokens if kv_capacity_tokens is None else kv_capacity_tokens,
            self.swap_pool_capacity_bytes if swap_pool_bytes is None else swap_pool_bytes,
        )
        return other

    # ------------------------------------------------------------------ setup

    def _init_from_model(
        self, model: Any, tokenizer: Any, model_name: str, max_batch: int, kv_capacity_tokens: int, swap_pool_bytes: int
    ) -> None:
        config = model.config
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"the hf backend runs Llama-family models ({', '.join(sorted(SUPPORTED_MODEL_TYPES))}); "
                f"{model_name!r} is {config.model_type!r}"
            )
        if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
            if config.model_type == "mistral":
                raise ValueError(f"{model_name!r} uses sliding-window attention, which the hf backend lacks")
        self.model_name = model_name
        self.tokenizer = tokenizer
        self.max_context = int(config.max_position_embeddings)
        self.eos_token_ids = self._eos_ids(model, tokenizer)

        self.num_layers = int(config.num_hidden_layers)
        self.num_heads = int(config.num_attention_heads)
        self.num_kv_heads = int(getattr(config, "num_key_value_heads", None) or self.num_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.num_heads)
        self.group = self.num_heads // self.num_kv_heads
        self.hidden_size = int(config.hidden_size)
        self.intermediate_size = int(config.intermediate_size)
        self.rms_eps = float(config.rms_norm_eps)

        model = model.to(self.device)
        self.w = self._collect_weights(model)
        del model
        self._init_state(max_batch, kv_capacity_tokens, swap_pool_bytes)

    def _init_state(self, max_batch: int, kv_capacity_tokens: int, swap_pool_bytes: int) -> None:
        self.max_batch = max_batch
        self.kv_capacity_tokens = kv_capacity_tokens
        self.swap_pool_capacity_bytes = swap_pool_bytes
        self._itemsize = torch.empty((), dtype=self.dtype).element_size()
        self._kv_shape_tail = (self.num_layers, 2, self.num_kv_heads, self.head_dim)
        self._slab_sizes = self._slab_capacities()
        self._slabs: dict[int, _Slab] = {}
        self._seqs: dict[str, _Seq] = {}
        self._generators: dict[str, torch.Generator] = {}
        self._resident_tokens = 0
        pin = self.device.type == "cuda"
        with torch.inference_mode():
            self._pool = _SwapPool(swap_pool_bytes, self.dtype, pin)
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

    def _collect_weights(self, model: Any) -> _Weights:
        inner = model.model
        with torch.inference_mode():
            layers = inner.layers
            qkv, qkv_bias, o, o_bias, gate_up, down, in_norm, post_norm = [], [], [], [], [], [], [], []
            for layer in layers:
                attn, mlp = layer.self_attn, layer.mlp
                qkv.append(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).contiguous())
                if attn.q_proj.bias is not None:
                    qkv_bias.append(torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]))
                else:
                    qkv_bias.append(None)
                o.append(attn.o_proj.weight.detach())
                o_bias.append(attn.o_proj.bias.detach() if attn.o_proj.bias is not None else None)
                if mlp.gate_proj.bias is not None or mlp.up_proj.bias is not None or mlp.down_proj.bias is not None:
                    raise ValueError("MLP biases are not supported by the hf backend")
                gate_up.append(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).contiguous())
                down.append(mlp.down_proj.weight.detach())
                in_norm.append(layer.input_layernorm.weight.detach())
                post_norm.append(layer.post_attention_layernorm.weight.detach())
                act = getattr(mlp.act_fn, "__class__", type(None)).__name__.lower()
                if "silu" not in act and "swish" not in act:
                    raise ValueError(f"MLP activation {act!r} is not supported by the hf backend")
            lm_head = model.lm_head.weight.detach()
            # cos/sin for every position, computed by the model's own rotary module (same numbers)
            positions = torch.arange(self.max_context, device=self.device)[None, :]
            probe = torch.empty(1, dtype=self.dtype, device=self.device)
            cos, sin = inner.rotary_emb(probe, positions)
            return _Weights(
                embed=inner.embed_tokens.weight.detach(),
                final_norm=inner.norm.weight.detach(),
                lm_head_chunks=list(lm_head.split(LM_HEAD_CHUNK_ROWS)),
                input_norm=in_norm,
                post_norm=post_norm,
                qkv=qkv,
                qkv_bias=qkv_bias,
                o=o,
                o_bias=o_bias,
                gate_up=gate_up,
                down=down,
                cos=cos[0].contiguous(),
                sin_signed=torch.cat((-sin[0, :, : self.head_dim // 2], sin[0, :, self.head_dim // 2 :]), -1),
            )

    def _slab_capacities(self) -> list[int]:
        sizes = []
        cap = MIN_SLAB_TOKENS
        while cap < self.max_context:
            sizes.append(cap)
            cap *= 2
        sizes.append(self.max_context)
        return sizes

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
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * self._itemsize

    def kv_tokens_used(self) -> int:
        return self._resident_tokens

    def kv_tokens_capacity(self) -> int:
        return self.kv_capacity_tokens

    def swap_pool_bytes_used(self) -> int:
        return self._pool.used * self._pool.itemsize

    def kv_slab_bytes(self) -> int:
        """Device memory the KV slabs occupy now (capacity rounding and free slots included)."""
        return sum(s.kv.numel() for s in self._slabs.values()) * self._itemsize

    def can_swap_out(self, seq_id: str) -> bool:
        seq = self._seqs.get(seq_id)
        if seq is None or seq.slab is None:
            return False
        return self._pool.fits(self._region_elems(seq.length))

    def seq_length(self, seq_id: str) -> int:
        """Tokens in the sequence's KV (resident or swapped); 0 for an unknown or dropped sequence."""
        seq = self._seqs.get(seq_id)
        return seq.length if seq is not None else 0

    def is_swapped(self, seq_id: str) -> bool:
        seq = self._seqs.get(seq_id)
        return seq is not None and seq.swapped is not None

    def _region_elems(self, tokens: int) -> int:
        return self.num_layers * 2 * self.num_kv_heads * tokens * self.head_dim

    def _slab_for(self, tokens: int) -> _Slab:
        i = bisect.bisect_left(self._slab_sizes, tokens)
        if i == len(self._slab_sizes):
            raise SequenceStateError(f"{tokens} tokens exceed the model's context of {self.max_context}")
        cap = self._slab_sizes[i]
        slab = self._slabs.get(cap)
        if slab is None:
            # start small for long slabs (a 2k-token slot is 90 MiB for SmolLM2 in float32)
            per_slot = cap * self.kv_bytes_per_token()
            slots = max(1, min(self.max_batch, 8, INITIAL_SLAB_BYTES // per_slot))
            slab = _Slab(cap, self._kv_shape_tail, slots, self.dtype, self.device)
            self._slabs[cap] = slab
        return slab

    def _free_slot(self, seq: _Seq) -> None:
        if seq.slab is not None:
            slab = seq.slab
            slab.release(seq.slot)
            self._resident_tokens -= seq.length
            seq.slab, seq.slot = None, -1
            if slab.used == 0 and self.kv_slab_bytes() > self.kv_capacity_tokens * self.kv_bytes_per_token():
                # keep empty slabs for reuse while the slabs fit in the KV budget's bytes
                del self._slabs[slab.capacity]

    def _place(self, seq: _Seq, tokens: int) -> None:
        """Give ``seq`` a slot that holds ``tokens``, moving its first ``seq.length`` tokens if needed."""
        if seq.slab is not None and tokens <= seq.slab.capacity:
            return
        slab = self._slab_for(tokens)
        slot = slab.allocate()
        if seq.slab is not None:
            n = seq.length
            if n:
                slab.kv[:, :, slot, :, :n].copy_(seq.slab.kv[:, :, seq.slot, :, :n])
            old_len = seq.length
            self._free_slot(seq)
            seq.length = old_len
        seq.slab, seq.slot = slab, slot
        self._resident_tokens += seq.length

    # ------------------------------------------------------------------ lifecycle

    def release(self, seq_id: str) -> None:
        with self._lock:
            self._generators.pop(seq_id, None)
            seq = self._seqs.pop(seq_id, None)
            if seq is None:
                return
            self._free_slot(seq)
            if seq.swapped is not None:
                self._pool.release(seq.swapped.offset, self._region_elems(seq.swapped.length))

    def drop(self, seq_id: str) -> None:
        """Discard the KV (resident or swapped); the sampler's random state is kept."""
        with self._lock:
            seq = self._seqs.pop(seq_id, None)
            if seq is None:
                return
            self._free_slot(seq)
            if seq.swapped is not None:
                self._pool.release(seq.swapped.offset, self._region_elems(seq.swapped.length))

    def swap_out(self, seq_id: str) -> SwapStats:
        with self._lock, torch.inference_mode():
            seq = self._require(seq_id)
            if seq.swapped is not None:
                raise SequenceStateError(f"sequence {seq_id!r} is already swapped out")
            started = time.perf_counter()
            n = seq.length
            size = self._region_elems(n)
            offset = self._pool.allocate(size)
            if offset is None:
                raise SwapPoolFullError(
                    f"swap pool full: {size * self._itemsize} bytes needed for {seq_id!r}, "
                    f"{self.swap_pool_bytes_used()} of {self.swap_pool_capacity_bytes} in use"
                )
            if n and seq.slab is not None:
                dst = self._pool.buffer[offset : offset + size].view(
                    self.num_layers, 2, self.num_kv_heads, n, self.head_dim
                )
                # one gather of every layer's K and V into one contiguous region
                dst.copy_(seq.slab.kv[:, :, seq.slot, :, :n], non_blocking=self.device.type == "cuda")
                if self.device.type == "cuda":
                    torch.cuda.current_stream(self.device).synchronize()
            self._free_slot(seq)
            seq.length = n
            seq.swapped = _SwapRegion(offset, n)
            return SwapStats(bytes=size * self._itemsize, elapsed_s=time.perf_counter() - started)

    def swap_in(self, seq_id: str) -> SwapStats:
        with self._lock, torch.inference_mode():
            seq = self._require(seq_id)
            region = seq.swapped
            if region is None:
                raise SequenceStateError(f"sequence {seq_id!r} is not swapped out")
            n = region.length
            if self._resident_tokens + n > self.kv_capacity_tokens:
                raise KVCapacityError(
                    f"swap-in of {n} tokens exceeds the KV capacity ({self._resident_tokens} of "
                    f"{self.kv_capacity_tokens} in use)"
                )
            started = time.perf_counter()
            size = self._region_elems(n)
            seq.length = 0
            self._place(seq, min(n + 1, self.max_context))  # room for the next token
            if n:
                src = self._pool.buffer[region.offset : region.offset + size].view(
                    self.num_layers, 2, self.num_kv_heads, n, self.head_dim
                )
                seq.slab.kv[:, :, seq.slot, :, :n].copy_(src, non_blocking=self.device.type == "cuda")  # type: ignore[union-attr]
                if self.device.type == "cuda":
                    torch.cuda.current_stream(self.device).synchronize()
            seq.length = n
            self._resident_tokens += n
            self._pool.release(region.offset, size)
            seq.swapped = None
            return SwapStats(bytes=size * self._itemsize, elapsed_s=time.perf_counter() - started)

    def _require(self, seq_id: str) -> _Seq:
        seq = self._seqs.get(seq_id)
        if seq is None:
            raise SequenceStateError(f"unknown sequence {seq_id!r} (never run, released or dropped)")
        return seq

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
            self._validate(batch)
            # positions before start_pos are never written by this step: safe to roll back to
            before = {w.seq_id: w.start_pos if w.seq_id in self._seqs else None for w in batch.work}
            try:
                plan = self._plan(batch)
                logits = self._forward(plan)
                next_tokens = self._sample(plan, logits)
            except BaseException:
                self._roll_back(before)
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

    def _roll_back(self, before: dict[str, int | None]) -> None:
        for seq_id, length in before.items():
            seq = self._seqs.get(seq_id)
            if seq is None:
                continue
            if length is None:
                self._free_slot(seq)
                del self._seqs[seq_id]
            elif seq.slab is not None:
                self._resident_tokens += length - seq.length
                seq.length = length

    def _validate(self, batch: StepBatch) -> None:
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
            seq = self._seqs.get(w.seq_id)
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
        if self._resident_tokens + growth > self.kv_capacity_tokens:
            raise KVCapacityError(
                f"step needs {growth} more KV tokens; {self._resident_tokens} of {self.kv_capacity_tokens} in use"
            )

    def _plan(self, batch: StepBatch) -> _Plan:
        work = batch.work
        # place every sequence (slabs may move or grow here, before any tensor views are taken)
        for w in work:
            seq = self._seqs.get(w.seq_id)
            if seq is None:
                seq = self._seqs[w.seq_id] = _Seq()
            end = w.start_pos + len(w.token_ids)
            if w.start_pos < seq.length:  # rewind: overwrite the tail
                self._resident_tokens -= seq.length - w.start_pos
                seq.length = w.start_pos
            self._place(seq, end)
            self._resident_tokens += end - seq.length
            seq.length = end

        decode = [w for w in work if len(w.token_ids) == 1]
        prefill = [w for w in work if len(w.token_ids) > 1]
        decode.sort(key=lambda w: (self._seqs[w.seq_id].slab.capacity, self._seqs[w.seq_id].slot))  # type: ignore[union-attr]
        ordered = decode + prefill
        token_ids: list[int] = []
        positions: list[int] = []
        for w in ordered:
            token_ids.extend(w.token_ids)
            positions.extend(range(w.start_pos, w.start_pos + len(w.token_ids)))
        dev = self.device
        plan = _Plan(
            token_ids=torch.tensor(token_ids, dtype=torch.long, device=dev),
            positions=torch.tensor(positions, dtype=torch.long, device=dev),
        )

        row = 0
        i = 0
        while i < len(decode):
            slab = self._seqs[decode[i].seq_id].slab
            j = i
            while j < len(decode) and self._seqs[decode[j].seq_id].slab is slab:
                j += 1
            group = decode[i:j]
            slots = [self._seqs[w.seq_id].slot for w in group]
            lengths = [w.start_pos + 1 for w in group]
            span = slots[-1] + 1
            scatter = span != len(group)
            keys = max(lengths)
            if scatter:
                span_lengths = [1] * span
                for s, n in zip(slots, lengths, strict=True):
                    span_lengths[s] = n
            else:
                span_lengths = lengths
            lens_t = torch.tensor(span_lengths, device=dev)
            mask = (torch.arange(keys, device=dev)[None, :] < lens_t[:, None])[:, None, None, :]
            assert slab is not None
            plan.decode.append(
                _DecodeGroup(
                    slab=slab,
                    row_start=row,
                    rows=len(group),
                    slots=torch.tensor(slots, dtype=torch.long, device=dev),
                    positions=torch.tensor([w.start_pos for w in group], dtype=torch.long, device=dev),
                    span=span,
                    scatter=scatter,
                    keys=keys,
                    mask=mask,
                )
            )
            row += len(group)
            i = j
        for w in prefill:
            seq = self._seqs[w.seq_id]
            t = len(w.token_ids)
            mask = None
            if w.start_pos > 0:
                q_pos = torch.arange(w.start_pos, w.start_pos + t, device=dev)
                mask = torch.arange(w.start_pos + t, device=dev)[None, :] <= q_pos[:, None]
            assert seq.slab is not None
            plan.prefill.append(_PrefillItem(seq.slab, seq.slot, row, t, w.start_pos, mask))
            row += t

        row = 0
        for w in ordered:
            row += len(w.token_ids)
            if w.sample:
                plan.sample_rows.append(row - 1)
                plan.sample_work.append(w)
        return plan

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            # one fused kernel; bit-identical to transformers' LlamaRMSNorm in float32
            return F.rms_norm(x, (x.shape[-1],), weight, self.rms_eps)
        h = x.to(torch.float32)  # transformers' LlamaRMSNorm, verbatim
        variance = h.pow(2).mean(-1, keepdim=True)
        h = h * torch.rsqrt(variance + self.rms_eps)
        return weight * h.to(x.dtype)

    def _forward(self, plan: _Plan) -> torch.Tensor | None:
        w = self.w
        n = plan.token_ids.numel()
        hq, hkv, hd, grp = self.num_heads, self.num_kv_heads, self.head_dim, self.group
        q_width = hq * hd
        qk_heads = hq + hkv
        half = hd // 2
        cos = w.cos[plan.positions][:, None, :]
        sin = w.sin_signed[plan.positions][:, None, :]
        h = w.embed[plan.token_ids]
        for li in range(self.num_layers):
            x = self._rms_norm(h, w.input_norm[li])
            qkv = F.linear(x, w.qkv[li], w.qkv_bias[li])
            # RoPE on q and k together, written back into qkv: x*cos + rotate_half(x)*sin, where
            # rotate_half(x) * sin == roll(x, half) * [-sin1, sin2] bit for bit
            qk = qkv[:, : qk_heads * hd].view(n, qk_heads, hd)
            torch.add(qk * cos, qk.roll(half, dims=-1) * sin, out=qk)
            q = qk[:, :hq]
            new_kv = qkv[:, q_width:].view(n, 2, hkv, hd)  # roped K, then V
            kv = None
            outs: list[torch.Tensor] = []
            for g in plan.decode:
                kv = g.slab.kv[li]  # [2, slots, kv_heads, capacity, head_dim]
                a, b = g.row_start, g.row_start + g.rows
                kv[:, g.slots, :, g.positions] = new_kv[a:b]
                qg = q[a:b].reshape(g.rows, hkv, grp, hd)  # query heads sharing a KV head -> query rows
                if g.scatter:
                    qfull = qg.new_zeros((g.span, hkv, grp, hd))
                    qfull[g.slots] = qg
                    qg = qfull
                o = F.scaled_dot_product_attention(
                    qg, kv[0, : g.span, :, : g.keys], kv[1, : g.span, :, : g.keys], attn_mask=g.mask
                )
                if g.scatter:
                    o = o[g.slots]
                outs.append(o.reshape(g.rows, q_width))
            for p in plan.prefill:
                kv = p.slab.kv[li]
                a, b = p.row_start, p.row_start + p.rows
                end = p.start + p.rows
                kv[:, p.slot, :, p.start : end] = new_kv[a:b].permute(1, 2, 0, 3)
                o = F.scaled_dot_product_attention(
                    q[a:b].transpose(0, 1)[None],
                    kv[0, p.slot : p.slot + 1, :, :end],
                    kv[1, p.slot : p.slot + 1, :, :end],
                    attn_mask=p.mask,
                    is_causal=p.mask is None,
                    enable_gqa=True,
                )
                outs.append(o[0].transpose(0, 1).reshape(p.rows, q_width))
            attn = outs[0] if len(outs) == 1 else torch.cat(outs)
            h = h + F.linear(attn, w.o[li], w.o_bias[li])
            x = self._rms_norm(h, w.post_norm[li])
            gate_up = F.linear(x, w.gate_up[li])
            gate, up = gate_up.split(self.intermediate_size, dim=-1)
            h = h + F.linear(F.silu(gate, inplace=True) * up, w.down[li])
        if not plan.sample_rows:
            return None
        rows = torch.tensor(plan.sample_rows, dtype=torch.long, device=self.device)
        x = self._rms_norm(h[rows], w.final_norm)
        logits = torch.empty((x.shape[0], sum(c.shape[0] for c in w.lm_head_chunks)), dtype=x.dtype, device=self.device)
        col = 0
        for chunk in w.lm_head_chunks:
            torch.mm(x, chunk.t(), out=logits[:, col : col + chunk.shape[0]])
            col += chunk.shape[0]
        return logits

    def _sample(self, plan: _Plan, logits: torch.Tensor | None) -> dict[str, int]:
        if logits is None:
            return {}
        logits = logits.float()
        greedy = logits.argmax(dim=-1).tolist()
        out: dict[str, int] = {}
        for i, w in enumerate(plan.sample_work):
            if w.temperature <= 0.0:
                out[w.seq_id] = int(greedy[i])
                continue
            gen = self._generators.get(w.seq_id)
            if gen is None:
                gen = torch.Generator(device=self.device)
                gen.manual_seed(w.seed if w.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
                self._generators[w.seq_id] = gen
            probs = torch.softmax(logits[i] / w.temperature, dim=-1)
            out[w.seq_id] = int(torch.multinomial(probs, 1, generator=gen).item())
        return out

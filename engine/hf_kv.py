"""The ``hf`` backend's KV store: per-capacity slabs of sequence slots, and a CPU pool of contiguous regions.

- A *slab* holds sequences of up to ``capacity`` tokens (powers of two from :data:`MIN_SLAB_TOKENS`
  up to the model's context) in the slots of one tensor
  ``[layers, 2 (K,V), slots, kv_heads, capacity, head_dim]``. A sequence that outgrows its slab moves
  to the next one (amortised doubling); a full slab doubles its slot count; an empty slab is freed
  once the slabs exceed the KV capacity's bytes. One slot per sequence keeps a decode step at one SDPA
  call per slab per layer.
- The :class:`CpuPool` is a preallocated flat buffer with a first-fit allocator of contiguous
  regions. A region holds one sequence's KV laid out ``[layers, 2, kv_heads, tokens, head_dim]``, so
  moving a sequence out or in is *one* strided copy (every layer's K and V at once): the preemption
  swap pool and the prefix cache's CPU tier are both pools of this kind.

:class:`KVStore` owns the slabs and the running sequences (``_resident_tokens`` counts their tokens);
the prefix cache (``engine/hf_prefix_cache.py``) keeps retained slots in the same slabs.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import torch

#: Smallest KV slab capacity in tokens; slabs double from here up to ``max_context``.
MIN_SLAB_TOKENS = 256
#: Initial size of a new KV slab (it doubles its slot count when full).
INITIAL_SLAB_BYTES = 256 << 20


class KVCapacityError(MemoryError):
    """A step or a swap-in would hold more KV tokens than ``kv_capacity_tokens``."""


class SwapPoolFullError(MemoryError):
    """The CPU swap pool has no contiguous room for the sequence: drop it (recompute) instead."""


class SequenceStateError(RuntimeError):
    """The engine asked for something the sequence's state does not allow (e.g. running it swapped)."""


class Slab:
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
class Region:
    offset: int  # in elements of the pool
    length: int  # tokens


@dataclass(slots=True)
class Seq:
    """A sequence's KV: in a slab slot (resident), in the swap pool (swapped), or neither (empty)."""

    length: int = 0
    slab: Slab | None = None
    slot: int = -1
    swapped: Region | None = None
    #: the token ids at positions [0, length): what the prefix cache matches on
    tokens: list[int] = field(default_factory=list)
    #: the program the sequence belongs to (its work's ``prefix_key``)
    prefix_key: str | None = None


class CpuPool:
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


class KVStore:
    """Slabs of slots on the device, the running sequences in them, and the preemption swap pool."""

    def __init__(
        self,
        *,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        max_context: int,
        max_batch: int,
        kv_capacity_tokens: int,
        swap_pool_bytes: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.max_context = max_context
        self.max_batch = max_batch
        self.kv_capacity_tokens = kv_capacity_tokens
        self.dtype, self.device = dtype, device
        self.cuda = device.type == "cuda"
        self.itemsize = torch.empty((), dtype=dtype).element_size()
        self.shape_tail = (num_layers, 2, num_kv_heads, head_dim)
        self.slab_sizes = self._slab_capacities()
        self.slabs: dict[int, Slab] = {}
        self.seqs: dict[str, Seq] = {}
        #: tokens of the sequences (running calls) resident in slabs; retained prefixes not included
        self.resident_tokens = 0
        with torch.inference_mode():
            self.pool = CpuPool(swap_pool_bytes, dtype, pin=self.cuda)

    def _slab_capacities(self) -> list[int]:
        sizes = []
        cap = MIN_SLAB_TOKENS
        while cap < self.max_context:
            sizes.append(cap)
            cap *= 2
        sizes.append(self.max_context)
        return sizes

    # -- sizes ---------------------------------------------------------------------------------
    def bytes_per_token(self) -> int:
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * self.itemsize

    def region_elems(self, tokens: int) -> int:
        return self.num_layers * 2 * self.num_kv_heads * tokens * self.head_dim

    def slab_bytes(self) -> int:
        """Device memory the KV slabs occupy now (capacity rounding and free slots included)."""
        return sum(s.kv.numel() for s in self.slabs.values()) * self.itemsize

    def region_view(self, pool: CpuPool, offset: int, tokens: int) -> torch.Tensor:
        """A pool region as ``[layers, 2, kv_heads, tokens, head_dim]``."""
        size = self.region_elems(tokens)
        return pool.buffer[offset : offset + size].view(self.num_layers, 2, self.num_kv_heads, tokens, self.head_dim)

    # -- slots ---------------------------------------------------------------------------------
    def slab_for(self, tokens: int) -> Slab:
        i = bisect.bisect_left(self.slab_sizes, tokens)
        if i == len(self.slab_sizes):
            raise SequenceStateError(f"{tokens} tokens exceed the model's context of {self.max_context}")
        cap = self.slab_sizes[i]
        slab = self.slabs.get(cap)
        if slab is None:
            # start small for long slabs (a 2k-token slot is 90 MiB for SmolLM2 in float32)
            per_slot = cap * self.bytes_per_token()
            slots = max(1, min(self.max_batch, 8, INITIAL_SLAB_BYTES // per_slot))
            slab = Slab(cap, self.shape_tail, slots, self.dtype, self.device)
            self.slabs[cap] = slab
        return slab

    def release_slot(self, slab: Slab, slot: int) -> None:
        """Give a slot back; an empty slab goes once the slabs exceed the KV capacity's bytes."""
        slab.release(slot)
        if slab.used == 0 and self.slab_bytes() > self.kv_capacity_tokens * self.bytes_per_token():
            del self.slabs[slab.capacity]

    def free_slot(self, seq: Seq) -> None:
        if seq.slab is not None:
            self.release_slot(seq.slab, seq.slot)
            self.resident_tokens -= seq.length
            seq.slab, seq.slot = None, -1

    def place(self, seq: Seq, tokens: int) -> None:
        """Give ``seq`` a slot that holds ``tokens``, moving its first ``seq.length`` tokens if needed."""
        if seq.slab is not None and tokens <= seq.slab.capacity:
            return
        slab = self.slab_for(tokens)
        slot = slab.allocate()
        if seq.slab is not None:
            n = seq.length
            if n:
                slab.kv[:, :, slot, :, :n].copy_(seq.slab.kv[:, :, seq.slot, :, :n])
            old_len = seq.length
            self.free_slot(seq)
            seq.length = old_len
        seq.slab, seq.slot = slab, slot
        self.resident_tokens += seq.length

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.current_stream(self.device).synchronize()

    # -- lifecycle -----------------------------------------------------------------------------
    def require(self, seq_id: str) -> Seq:
        seq = self.seqs.get(seq_id)
        if seq is None:
            raise SequenceStateError(f"unknown sequence {seq_id!r} (never run, released or dropped)")
        return seq

    def forget(self, seq_id: str) -> Seq | None:
        """Remove a sequence and free its slot and swap region; returns it (None if unknown)."""
        seq = self.seqs.pop(seq_id, None)
        if seq is None:
            return None
        self.free_slot(seq)
        if seq.swapped is not None:
            self.pool.release(seq.swapped.offset, self.region_elems(seq.swapped.length))
            seq.swapped = None
        return seq

    def can_swap_out(self, seq_id: str) -> bool:
        seq = self.seqs.get(seq_id)
        if seq is None or seq.slab is None:
            return False
        return self.pool.fits(self.region_elems(seq.length))

    def swap_out(self, seq_id: str) -> int:
        """Gather the sequence's KV into one region of the swap pool; returns the bytes moved."""
        seq = self.require(seq_id)
        if seq.swapped is not None:
            raise SequenceStateError(f"sequence {seq_id!r} is already swapped out")
        n = seq.length
        size = self.region_elems(n)
        offset = self.pool.allocate(size)
        if offset is None:
            raise SwapPoolFullError(
                f"swap pool full: {size * self.itemsize} bytes needed for {seq_id!r}, "
                f"{self.pool.used * self.itemsize} of {self.pool.capacity * self.itemsize} in use"
            )
        if n and seq.slab is not None:
            # one gather of every layer's K and V into one contiguous region
            self.region_view(self.pool, offset, n).copy_(seq.slab.kv[:, :, seq.slot, :, :n], non_blocking=self.cuda)
            self.sync()
        self.free_slot(seq)
        seq.length = n
        seq.swapped = Region(offset, n)
        return size * self.itemsize

    def swap_in(self, seq_id: str) -> int:
        """Copy a swapped sequence back into a slot (the caller checked the KV capacity); returns bytes."""
        seq = self.require(seq_id)
        region = seq.swapped
        if region is None:
            raise SequenceStateError(f"sequence {seq_id!r} is not swapped out")
        n = region.length
        size = self.region_elems(n)
        seq.length = 0
        self.place(seq, min(n + 1, self.max_context))  # room for the next token
        if n:
            assert seq.slab is not None
            seq.slab.kv[:, :, seq.slot, :, :n].copy_(
                self.region_view(self.pool, region.offset, n), non_blocking=self.cuda
            )
            self.sync()
        seq.length = n
        self.resident_tokens += n
        self.pool.release(region.offset, size)
        seq.swapped = None
        return size * self.itemsize

    def extend(self, seq_id: str, start_pos: int, token_ids: list[int], prefix_key: str | None) -> Seq:
        """Make room for ``token_ids`` at ``start_pos`` onward (a new sequence, a rewind, or growth).

        The caller validated positions and the budget; the forward pass writes the KV afterwards."""
        seq = self.seqs.get(seq_id)
        if seq is None:
            seq = self.seqs[seq_id] = Seq()
        if prefix_key is not None:
            seq.prefix_key = prefix_key
        end = start_pos + len(token_ids)
        if start_pos < seq.length:  # rewind: overwrite the tail
            self.resident_tokens -= seq.length - start_pos
            seq.length = start_pos
        del seq.tokens[start_pos:]
        self.place(seq, end)
        self.resident_tokens += end - seq.length
        seq.length = end
        seq.tokens.extend(token_ids)
        return seq

    def roll_back(self, before: dict[str, int | None]) -> None:
        """Undo :meth:`extend` after a failed step: each sequence back to its length before it."""
        for seq_id, length in before.items():
            seq = self.seqs.get(seq_id)
            if seq is None:
                continue
            if length is None:
                self.free_slot(seq)
                del self.seqs[seq_id]
            elif seq.slab is not None:
                self.resident_tokens += length - seq.length
                seq.length = length
                del seq.tokens[length:]

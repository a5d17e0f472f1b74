"""The ``vllm`` backend (optional extra, needs a GPU): vLLM's engine in process, scheduled by ours.

vLLM V1 preempts only under memory pressure, never for a waiting higher-priority call, and recomputes
rather than swaps. So Autellix keeps admission and preemption in its own engine core and uses vLLM as
the executor of the running set:

- a call that joins the running batch is added to vLLM as a request whose prompt is every token of the
  call so far (prompt + tokens generated before), greedy or seeded, ignoring end-of-sequence: the
  engine core decides when a call stops;
- a call that the core preempts is aborted in vLLM (``drop``) and re-added when it runs again, with the
  prompt plus the tokens generated so far, which vLLM's prefix cache (enable it) and, if configured, its
  CPU KV offload turn into little or no recomputation. There is no swap pool here: the core sees
  ``swap_pool_capacity_bytes == 0`` and always takes the recompute path;
- one :meth:`run` advances vLLM by whole steps until every call that must sample this step has a new
  token; tokens a request produces beyond that are kept and handed out in later steps.

We drive ``vllm.LLMEngine`` (its synchronous step, the loop ``AsyncLLM`` runs for itself) from the
engine service's worker thread, the thread every backend's ``run`` executes in.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from .backend import StepBatch, StepOutput, SwapStats


class VLLMUnavailableError(RuntimeError):
    pass


class VLLMBackend:
    name = "vllm"
    #: no CPU swap pool: every preemption is a drop + recompute (through vLLM's prefix cache)
    swap_pool_capacity_bytes = 0

    def __init__(self, model: str, engine: Any | None = None, **engine_args: Any) -> None:
        """``engine``: an object with vLLM's ``LLMEngine`` surface (``add_request``, ``step``,
        ``abort_request``, ``get_tokenizer``), for tests; otherwise one is built for ``model``."""
        try:
            from vllm import SamplingParams
            from vllm.sampling_params import RequestOutputKind
        except ImportError as exc:
            raise VLLMUnavailableError(
                "the vllm backend needs vLLM and a GPU: pip install 'autellix[vllm]' on a CUDA machine"
            ) from exc
        self._sampling_params = SamplingParams
        self._delta = RequestOutputKind.DELTA
        if engine is None:
            from vllm import EngineArgs, LLMEngine

            args = EngineArgs(model=model, enable_prefix_caching=True, **engine_args)
            engine = LLMEngine.from_engine_args(args)
        self.engine = engine
        self.tokenizer = engine.get_tokenizer()
        self.model_name = model
        config = getattr(engine, "model_config", None)
        self.max_context = int(getattr(config, "max_model_len", 0) or 8192)
        eos = getattr(self.tokenizer, "eos_token_id", None)
        self.eos_token_ids: frozenset[int] = frozenset([eos] if isinstance(eos, int) else [])
        self._request_ids: dict[str, str] = {}  # seq id -> its current vLLM request id
        self._active: dict[str, int] = {}  # seq id -> tokens vLLM holds for it (prompt + generated)
        self._pending: dict[str, deque[int]] = {}  # tokens produced but not handed out yet
        self._held: dict[str, list[int]] = {}  # prompt chunks of a sequence not yet sent to vLLM
        self._generation = 0

    # -- text ------------------------------------------------------------------------------
    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        ids = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
        return list(ids)

    def encode_prompt(self, prompt: str) -> list[int]:
        return list(self.tokenizer.encode(prompt, add_special_tokens=False))

    def decode(self, token_ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(token_ids), skip_special_tokens=True))

    # -- execution ---------------------------------------------------------------------------
    def run(self, batch: StepBatch) -> StepOutput:
        started = time.perf_counter()
        want: list[str] = []
        for w in batch.work:
            if w.seq_id not in self._active:
                held = self._held.setdefault(w.seq_id, [])
                if w.start_pos != len(held):
                    raise RuntimeError(f"sequence {w.seq_id!r} must be prefilled from position 0 after a drop")
                held.extend(w.token_ids)
                if not w.sample:  # vLLM prefills whole prompts itself: hold chunks until the last one
                    continue
                prompt = self._held.pop(w.seq_id)
                params = self._sampling_params(
                    temperature=w.temperature,
                    seed=w.seed,
                    max_tokens=self.max_context,
                    ignore_eos=True,
                    output_kind=self._delta,
                )
                self._generation += 1
                request_id = self._request_ids[w.seq_id] = f"{w.seq_id}#{self._generation}"
                self._active[w.seq_id] = len(prompt)
                self.engine.add_request(request_id, {"prompt_token_ids": prompt}, params)
                self._pending[w.seq_id] = deque()
            if w.sample:
                want.append(w.seq_id)
        by_request = {rid: sid for sid, rid in self._request_ids.items()}
        while any(not self._pending[s] for s in want):
            for out in self.engine.step():
                seq_id = by_request.get(out.request_id)
                if seq_id is not None:
                    self._pending[seq_id].extend(out.outputs[0].token_ids)
        tokens = {s: self._pending[s].popleft() for s in want}
        for s in want:
            self._active[s] += 1
        return StepOutput(next_tokens=tokens, elapsed_s=time.perf_counter() - started)

    def release(self, seq_id: str) -> None:
        request_id = self._request_ids.pop(seq_id, None)
        if request_id is not None:
            self.engine.abort_request([request_id])
        self._active.pop(seq_id, None)
        self._pending.pop(seq_id, None)
        self._held.pop(seq_id, None)

    def drop(self, seq_id: str) -> None:
        self.release(seq_id)

    def swap_out(self, seq_id: str) -> SwapStats:
        raise MemoryError("the vllm backend has no swap pool; preemption recomputes through the prefix cache")

    def swap_in(self, seq_id: str) -> SwapStats:
        raise MemoryError("the vllm backend has no swap pool")

    def kv_bytes_per_token(self) -> int:
        return 1

    def swap_pool_bytes_used(self) -> int:
        return 0

    def kv_tokens_used(self) -> int:
        return sum(self._active.values())

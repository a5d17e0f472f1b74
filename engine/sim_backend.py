"""The ``sim`` backend: no model. Step times come from the cost model; tokens are placeholders.

Used to run the whole mesh at scale on a CPU. Text is "tokenised" one token per whitespace-
separated word; generated tokens decode to ``" tok"`` each. The backend never emits an
end-of-sequence token, so every call runs to ``max_tokens``. ``time_scale`` multiplies every
modelled duration (0 makes steps instantaneous, 1 is real time on the modelled GPU).
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Sequence

from .backend import StepBatch, StepOutput, SwapStats
from .cost_model import CostModel, llama31_8b_h100

#: Token ids below this are "words" of the prompt; generated tokens use ids from here on.
_GENERATED = 50_000


class SimBackend:
    name = "sim"

    def __init__(self, cost: CostModel | None = None, time_scale: float = 1.0) -> None:
        self.cost = cost or llama31_8b_h100()
        self.time_scale = time_scale
        self.model_name = f"sim:{self.cost.name}"
        self.max_context = self.cost.max_context
        self.eos_token_ids: frozenset[int] = frozenset()
        self._kv: dict[str, int] = {}
        self._swapped: dict[str, int] = {}

    # -- text ------------------------------------------------------------------------------
    def encode_prompt(self, prompt: str) -> list[int]:
        return [zlib.crc32(w.encode()) % _GENERATED for w in prompt.split()]

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        ids: list[int] = []
        for m in messages:
            ids.append(1)  # a role marker, as a chat template would add
            ids.extend(self.encode_prompt(m["content"]))
        return ids

    def decode(self, token_ids: Sequence[int]) -> str:
        return "".join(" tok" if t >= _GENERATED else " w" for t in token_ids)

    # -- execution ---------------------------------------------------------------------------
    def step_time(self, batch: StepBatch) -> float:
        prefill = decode = context = 0
        for w in batch.work:
            n = len(w.token_ids)
            if n == 1 and w.start_pos > 0:
                decode += 1
            else:
                prefill += n
            context += w.start_pos + n
        return self.cost.step_time(prefill, decode, context)

    def run(self, batch: StepBatch) -> StepOutput:
        modelled = self.step_time(batch) * self.time_scale
        started = time.perf_counter()
        if modelled > 0:
            time.sleep(modelled)
        out: dict[str, int] = {}
        for w in batch.work:
            end = w.start_pos + len(w.token_ids)
            self._kv[w.seq_id] = end
            if w.sample:
                out[w.seq_id] = _GENERATED + end % 1000
        return StepOutput(next_tokens=out, elapsed_s=time.perf_counter() - started)

    def release(self, seq_id: str) -> None:
        self._kv.pop(seq_id, None)
        self._swapped.pop(seq_id, None)

    def _sleep(self, seconds: float) -> float:
        if seconds > 0:
            time.sleep(seconds)
        return seconds

    def swap_out(self, seq_id: str) -> SwapStats:
        tokens = self._kv.pop(seq_id, 0)
        self._swapped[seq_id] = tokens
        elapsed = self._sleep(self.cost.swap_time(tokens) * self.time_scale)
        return SwapStats(bytes=tokens * self.cost.kv_bytes_per_token, elapsed_s=elapsed)

    def swap_in(self, seq_id: str) -> SwapStats:
        tokens = self._swapped.pop(seq_id, 0)
        self._kv[seq_id] = tokens
        elapsed = self._sleep(self.cost.swap_time(tokens) * self.time_scale)
        return SwapStats(bytes=tokens * self.cost.kv_bytes_per_token, elapsed_s=elapsed)

    def drop(self, seq_id: str) -> None:
        self.release(seq_id)

    def kv_bytes_per_token(self) -> int:
        return self.cost.kv_bytes_per_token

    def kv_tokens_used(self) -> int:
        return sum(self._kv.values())

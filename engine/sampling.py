"""Next-token sampling for a step: greedy (temperature 0) or seeded multinomial per sequence.

A sequence's random generator lives as long as the sequence (it survives swap and recompute, so
a seeded call gives the same tokens however often it is preempted); :meth:`Sampler.forget` ends it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from .backend import SeqWork


class Sampler:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._generators: dict[str, torch.Generator] = {}

    def forget(self, seq_id: str) -> None:
        self._generators.pop(seq_id, None)

    def sample(self, work: Sequence[SeqWork], logits: torch.Tensor | None) -> dict[str, int]:
        """One token per row of ``logits`` for the sequence ``work[row]``."""
        if logits is None:
            return {}
        logits = logits.float()
        greedy = logits.argmax(dim=-1).tolist()
        out: dict[str, int] = {}
        for i, w in enumerate(work):
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

"""Clipped log-normal distributions fitted to a target mean (numpy RNG, deterministic by seed).

The paper reports means and maxima, not shapes. We take log-normal shapes (heavy right tails, as
conversation lengths and token counts are), clip them to a range, and solve for the location
``mu`` that makes the *clipped* mean equal the reported mean exactly, so the generators match the
published statistics after clipping rather than before.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


def _phi(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def clipped_lognormal_mean(mu: float, sigma: float, lo: float, hi: float) -> float:
    """E[min(max(X, lo), hi)] for X ~ LogNormal(mu, sigma)."""
    a, b = math.log(lo), math.log(hi)
    body = math.exp(mu + sigma * sigma / 2.0) * (
        _phi((b - mu - sigma * sigma) / sigma) - _phi((a - mu - sigma * sigma) / sigma)
    )
    return lo * _phi((a - mu) / sigma) + body + hi * (1.0 - _phi((b - mu) / sigma))


def discrete_lognormal_mean(mu: float, sigma: float, lo: int, hi: int) -> float:
    """E[K] for K = clip(round(X), lo, hi), X ~ LogNormal(mu, sigma)."""
    if lo == hi:
        return float(lo)

    def cdf(x: float) -> float:
        return _phi((math.log(x) - mu) / sigma) if x > 0 else 0.0

    mean = lo * cdf(lo + 0.5) + hi * (1.0 - cdf(hi - 0.5))
    for k in range(lo + 1, hi):
        mean += k * (cdf(k + 0.5) - cdf(k - 0.5))
    return mean


def _bisect_mu(target: float, mean_of: Callable[[float], float], lo: float, hi: float) -> float:
    if not lo < target < hi:
        raise ValueError(f"mean {target} must lie strictly inside the clip range [{lo}, {hi}]")
    a, b = math.log(lo) - 10.0, math.log(hi) + 10.0
    for _ in range(200):
        m = 0.5 * (a + b)
        if mean_of(m) < target:
            a = m
        else:
            b = m
    return 0.5 * (a + b)


@dataclass(frozen=True, slots=True)
class _FittedLogNormal:
    """LogNormal(mu, sigma) clipped to [lo, hi], ``mu`` solved so that the clipped mean is ``mean``."""

    mean: float
    sigma: float
    lo: int
    hi: int
    mu: float = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "mu", _bisect_mu(self.mean, self._clipped_mean, self.lo, self.hi))

    def _clipped_mean(self, mu: float) -> float:
        return clipped_lognormal_mean(mu, self.sigma, self.lo, self.hi)


@dataclass(frozen=True, slots=True)
class TokenDist(_FittedLogNormal):
    """Token counts: round(clip(LogNormal)), fitted so the clipped mean is ``mean``."""

    def sample(self, rng: np.random.Generator, n: int) -> list[int]:
        x = rng.lognormal(self.mu, self.sigma, n)
        return np.clip(np.floor(x + 0.5), self.lo, self.hi).astype(np.int64).tolist()


@dataclass(frozen=True, slots=True)
class CountDist(_FittedLogNormal):
    """Small counts (calls per program): clip(round(LogNormal)), exact discrete mean fit."""

    def _clipped_mean(self, mu: float) -> float:
        return discrete_lognormal_mean(mu, self.sigma, self.lo, self.hi)

    def sample(self, rng: np.random.Generator) -> int:
        x = rng.lognormal(self.mu, self.sigma)
        return int(min(max(math.floor(x + 0.5), self.lo), self.hi))

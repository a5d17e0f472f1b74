"""Service per tenant, so that splitting work into many programs gains nothing.

Program-level least-attained-service ranks a program by the service *it* received. A client that
opens a new program for every call therefore always looks brand new: measured on a busy engine, it
waited 21x less than an honest long program doing the same work. The defence is to account service
per *tenant* (an authenticated client identity, or an API key at the gateway) as well, and charge a
program at least its tenant's recent service:

    stamp = max(the program's own priority, tenant's recent service)        while >= 2 tenants are active

so a tenant's hundredth one-call program starts where its single long program would stand. "Recent"
is service decayed exponentially with ``half_life_s`` (so a tenant that was busy an hour ago is not
punished now: llm-d's program-aware LAS decays the same way), and the rule applies only while at
least two tenants have recent service: with one tenant there is nobody to be fair to, and the
programs keep their own PLAS/ATLAS order. Across tenants the order is then least-recently-served
tenant first; within a tenant, programs above the tenant's level keep their own order.

Pure and synchronous: times are passed in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(slots=True)
class _Decayed:
    value: float
    at: float

    def at_time(self, now: float, rate: float) -> float:
        return self.value * math.exp(-rate * max(0.0, now - self.at))


class TenantAccounts:
    def __init__(self, half_life_s: float = 300.0, active_floor_s: float = 1e-3) -> None:
        if half_life_s <= 0:
            raise ValueError(f"half_life_s must be > 0, got {half_life_s}")
        self.half_life_s = half_life_s
        self._rate = math.log(2.0) / half_life_s
        #: below this much recent service a tenant no longer counts as active
        self.active_floor_s = active_floor_s
        self._tenants: dict[str, _Decayed] = {}
        self._pruned_at = -math.inf

    def charge(self, tenant: str, service_s: float, now: float) -> None:
        """The tenant received ``service_s`` more engine time (a program's service grew by it)."""
        if not tenant or service_s <= 0:
            return
        acc = self._tenants.get(tenant)
        if acc is None:
            self._tenants[tenant] = _Decayed(service_s, now)
            return
        acc.value = acc.at_time(now, self._rate) + service_s
        acc.at = max(acc.at, now)

    def recent(self, tenant: str, now: float) -> float:
        acc = self._tenants.get(tenant)
        return acc.at_time(now, self._rate) if acc is not None else 0.0

    def active(self, now: float) -> int:
        """Tenants with recent service above the floor (the ones below it are forgotten, at most once
        a second, so a stamp costs O(1) however many tenants there are)."""
        if now - self._pruned_at >= 1.0:
            self._pruned_at = now
            gone = [t for t, acc in self._tenants.items() if acc.at_time(now, self._rate) < self.active_floor_s]
            for t in gone:
                del self._tenants[t]
        return len(self._tenants)

    def stamp(self, tenant: str, program_priority: float, now: float) -> float:
        """The program's priority, raised to its tenant's recent service while tenants compete."""
        if not tenant or tenant not in self._tenants or self.active(now) < 2:
            return program_priority
        return max(program_priority, self.recent(tenant, now))

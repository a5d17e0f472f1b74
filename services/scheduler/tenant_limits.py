"""Per-tenant bounds on what one scheduler holds: calls in flight and their tokens.

Without them one tenant could fill every engine's waiting queue (and the scheduler's own tables)
and make everyone else wait behind it. A tenant may have at most ``max_calls`` calls and
``max_tokens`` tokens (each call's estimated prompt plus its ``max_tokens``) in flight through one
scheduler: routed and not yet seen to finish, or waiting for an engine. One more is refused with
``rate_limited`` at once, instead of queueing without bound. A resubmission of a call already under
way (``attempt`` > 0) is never refused: it continues work that was admitted. 0 disables a bound.

Who the tenant is: the authenticated user that submitted the call; for the users named in
``trusted_users`` (the gateway, which knows its API keys' tenants) the tenant the request names,
kept apart from user names as ``<user>/<tenant>``; without auth, the tenant the request names
(``""`` for every caller that names none: then the bounds hold for all of them together).

Pure and synchronous.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

#: defaults: a tenant's calls in flight through one scheduler, and their tokens
DEFAULT_MAX_CALLS = 4096
DEFAULT_MAX_TOKENS = 8 << 20


@dataclass(slots=True)
class TenantLoad:
    calls: int = 0
    tokens: int = 0


class TenantLimits:
    def __init__(
        self,
        max_calls: int = DEFAULT_MAX_CALLS,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        trusted_users: Iterable[str] = ("gateway",),
    ) -> None:
        if max_calls < 0 or max_tokens < 0:
            raise ValueError(f"tenant limits must be >= 0 (0: none), got {max_calls} calls, {max_tokens} tokens")
        self.max_calls = max_calls
        self.max_tokens = max_tokens
        self.trusted_users = frozenset(trusted_users)
        #: tenant -> its calls and tokens in flight (a tenant with none has no entry)
        self.loads: dict[str, TenantLoad] = {}

    def tenant_of(self, user: str, named: str) -> str:
        """The tenant a call is accounted to: ``user`` submitted it (``""`` without auth) and the
        request named ``named``. An ordinary user cannot pick its tenant (it could split itself
        into as many as it liked); a trusted one (the gateway) names its callers' tenants."""
        if not user:
            return named
        if user in self.trusted_users and named:
            return f"{user}/{named}"
        return user

    def refusal(self, tenant: str, tokens: int) -> str | None:
        """Why one more call of ``tokens`` tokens would break the tenant's bounds; None if it fits."""
        load = self.loads.get(tenant, TenantLoad())
        who = f"tenant {tenant[:80]!r}" if tenant else "callers without a tenant"
        if self.max_calls and load.calls >= self.max_calls:
            return (
                f"{who} already has {load.calls} calls in flight through this scheduler, its limit of"
                f" {self.max_calls}; wait for some to finish"
            )
        if self.max_tokens and load.tokens + tokens > self.max_tokens:
            return (
                f"{who} has {load.tokens} tokens in flight through this scheduler; this call's {tokens} more"
                f" would pass its limit of {self.max_tokens}; wait for some to finish"
            )
        return None

    def add(self, tenant: str, tokens: int) -> None:
        load = self.loads.get(tenant)
        if load is None:
            load = self.loads[tenant] = TenantLoad()
        load.calls += 1
        load.tokens += tokens

    def remove(self, tenant: str, tokens: int) -> None:
        load = self.loads.get(tenant)
        if load is None:
            return
        load.calls -= 1
        load.tokens -= tokens
        if load.calls <= 0:
            del self.loads[tenant]

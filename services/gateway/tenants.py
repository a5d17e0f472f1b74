"""API key -> tenant (pure).

Tenants do not exist in the mesh yet; this is the mapping they will use. Design:

- The operator gives the gateway a key table, ``AUTELLIX_API_KEYS``: ``key1=tenant-a,key2=tenant-b``,
  or ``@/path/to/file`` with one ``key=tenant`` per line (``#`` comments). Keys are secrets and are
  never logged; tenants are names and are.
- With no table the gateway is open (as ``autellix up`` on a laptop): any ``Authorization`` header,
  or none, is accepted and the tenant is ``""``.
- With a table, every request needs ``Authorization: Bearer <key>`` naming a listed key, else
  ``401 invalid_api_key``. The tenant travels with the call (``CallRequest.tenant``, an optional
  wire field) for the schedulers to account beside programs, and qualifies the program id
  (``tenant/program``), so tenants cannot join or end each other's programs.
- Several keys may name one tenant (key rotation). A tenant is never taken from the request itself:
  a priority scheduler must not trust its clients.
"""

from __future__ import annotations

from pathlib import Path


class Unauthorized(Exception):
    """No key, or a key the table does not list (a 401)."""


def parse_key_table(spec: str) -> dict[str, str]:
    """``key=tenant,...`` or ``@path`` (one ``key=tenant`` per line) -> {key: tenant}."""
    spec = spec.strip()
    if not spec:
        return {}
    if spec.startswith("@"):
        lines = Path(spec[1:]).read_text().splitlines()
        items = [line.split("#", 1)[0].strip() for line in lines]
    else:
        items = [item.strip() for item in spec.split(",")]
    table: dict[str, str] = {}
    for item in items:
        if not item:
            continue
        key, sep, tenant = item.partition("=")
        key, tenant = key.strip(), tenant.strip()
        if not sep or not key or not tenant or "/" in tenant:
            raise ValueError("each API key entry must be key=tenant (a tenant name without '/')")
        table[key] = tenant
    return table


class TenantMap:
    def __init__(self, table: dict[str, str]) -> None:
        self._table = dict(table)

    @property
    def open(self) -> bool:
        return not self._table

    def tenant(self, authorization: str | None) -> str:
        """The tenant of an ``Authorization`` header value; ``""`` when the gateway is open."""
        if self.open:
            return ""
        scheme, _, key = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthorized("missing API key: send Authorization: Bearer <key>")
        tenant = self._table.get(key.strip())
        if tenant is None:
            raise Unauthorized("invalid API key")
        return tenant

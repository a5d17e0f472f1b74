"""Which program a request belongs to, from what agents and gateways already send (pure).

An agent written against OpenAI's API does not know about Autellix programs, but its harness or the
gateway in front of it usually names a session. The program id is the first of these present:

1. header ``X-Autellix-Program``            (ours, explicit)
2. header ``X-Session-ID``                   (vLLM passes it through; many harnesses send it)
3. header ``x-dynamo-session-id``            (NVIDIA Dynamo)
4. header ``x-llm-d-inference-fairness-id``  (llm-d's fairness id)
5. body ``session_id``                       (SGLang session control, several SDKs)
6. body ``user``                             (OpenAI's end-user id)

A request with none of them is a program of one call (its id is the call id); the response says so
in ``X-Autellix-One-Call-Program: true``. ``X-Autellix-Parents: id1,id2`` names earlier calls of
the program (response ``id``s) this call depends on, for exact ATLAS stamps; an empty value marks a
root. ``X-Session-Final: true`` ends the program once the call is over.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

#: header names in precedence order (lower case: HTTP header names are case-insensitive)
PROGRAM_HEADERS = (
    "x-autellix-program",
    "x-session-id",
    "x-dynamo-session-id",
    "x-llm-d-inference-fairness-id",
)
#: body fields in precedence order, after the headers
PROGRAM_BODY_FIELDS = ("session_id", "user")
PARENTS_HEADER = "x-autellix-parents"
FINAL_HEADER = "x-session-final"
MAX_ID_CHARS = 256


class IdentityError(ValueError):
    """A program id or parents header that cannot be used (a 400)."""


@dataclass(frozen=True, slots=True)
class Identity:
    #: the id the mesh sees (tenant-qualified when the request came with a tenant's key)
    program_id: str
    #: the id as the client named it (what the response headers echo)
    client_program_id: str
    #: where it came from: "header:x-session-id", "body:user", ... or "none"
    source: str
    parents: list[str] | None
    final: bool

    @property
    def one_call(self) -> bool:
        return self.source == "none"

    def response_headers(self) -> dict[str, str]:
        return {
            "x-autellix-program": self.client_program_id,
            "x-autellix-program-source": self.source,
            "x-autellix-one-call-program": "true" if self.one_call else "false",
        }


def qualify(program_id: str, tenant: str) -> str:
    """The mesh-wide program id: a tenant's programs live in their own namespace, so one tenant can
    neither join nor end another's program by guessing its id."""
    return f"{tenant}/{program_id}" if tenant else program_id


def _clean(value: str, what: str) -> str:
    value = value.strip()
    if len(value) > MAX_ID_CHARS:
        raise IdentityError(f"{what} is longer than {MAX_ID_CHARS} characters")
    if any(ord(c) < 32 for c in value):
        raise IdentityError(f"{what} contains control characters")
    return value


def parse_parents(value: str | None) -> list[str] | None:
    """``X-Autellix-Parents``: None when absent, [] when empty (a root), else the listed call ids."""
    if value is None:
        return None
    parents = [_clean(p, "a parent id") for p in value.split(",")]
    return [p for p in parents if p]


def is_true(value: str | None) -> bool:
    return value is not None and value.strip().lower() in ("1", "true", "yes")


def resolve(headers: Mapping[str, str], body: Mapping[str, object], call_id: str, tenant: str = "") -> Identity:
    """The request's program identity. ``headers`` must look up case-insensitively (Starlette's do)."""
    client_id, source = "", "none"
    for header in PROGRAM_HEADERS:
        value = headers.get(header)
        if value and value.strip():
            client_id, source = _clean(value, f"header {header}"), f"header:{header}"
            break
    else:
        for name in PROGRAM_BODY_FIELDS:
            value = body.get(name)
            if isinstance(value, str) and value.strip():
                client_id, source = _clean(value, f"body field {name}"), f"body:{name}"
                break
    if not client_id:
        client_id = call_id
    return Identity(
        program_id=qualify(client_id, tenant),
        client_program_id=client_id,
        source=source,
        parents=parse_parents(headers.get(PARENTS_HEADER)),
        final=is_true(headers.get(FINAL_HEADER)),
    )

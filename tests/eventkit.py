"""Wire events as the services publish them, for the tests that feed a core or a table by hand."""

from __future__ import annotations

from typing import Any

from autellix.proto import CallCompleted


def completed(program_id: str, call_id: str, service_s: float = 1.0, **over: Any) -> CallCompleted:
    """A call that finished (``stop``) on engine ``e1`` after ``service_s`` of service, one prompt
    token and one output token; ``over`` sets any other field."""
    fields: dict[str, Any] = {
        "engine_id": "e1",
        "queue_wait_s": 0.0,
        "prompt_tokens": 1,
        "output_tokens": 1,
        "finish_reason": "stop",
        **over,
    }
    return CallCompleted(call_id=call_id, program_id=program_id, service_s=service_s, **fields)

"""The gateway's pure parts: program identity, API keys -> tenants, stop strings, request parsing."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from autellix.services.gateway.identity import IdentityError, parse_parents, resolve
from autellix.services.gateway.openai_api import ApiError, mesh_error, parse_chat, parse_completion
from autellix.services.gateway.stop_text import StopText
from autellix.services.gateway.tenants import TenantMap, Unauthorized, parse_key_table


class Headers(dict[str, str]):
    """Case-insensitive, as Starlette's."""

    def get(self, key: str, default: Any = None) -> Any:
        for k, v in self.items():
            if k.lower() == key.lower():
                return v
        return default


def test_identity_follows_the_documented_order() -> None:
    order = ["X-Autellix-Program", "X-Session-ID", "x-dynamo-session-id", "x-llm-d-inference-fairness-id"]
    body = {"session_id": "body-session", "user": "body-user"}
    for i, header in enumerate(order):
        headers = Headers({h: f"v{j}" for j, h in enumerate(order) if j >= i})
        ident = resolve(headers, body, "c1")
        assert ident.program_id == f"v{i}" and ident.source == f"header:{header.lower()}"
        assert not ident.one_call
    assert resolve(Headers(), body, "c1").program_id == "body-session"
    assert resolve(Headers(), {"user": "u"}, "c1").source == "body:user"
    alone = resolve(Headers({"X-Session-ID": "  "}), {"user": ""}, "c1")
    assert alone.one_call and alone.program_id == "c1"
    assert alone.response_headers()["x-autellix-one-call-program"] == "true"


def test_identity_tenant_parents_and_final() -> None:
    ident = resolve(
        Headers({"X-Session-ID": "s", "X-Autellix-Parents": "a, b,", "X-Session-Final": "True"}), {}, "c", "acme"
    )
    assert ident.program_id == "acme/s" and ident.client_program_id == "s"
    assert ident.parents == ["a", "b"] and ident.final
    assert parse_parents(None) is None and parse_parents("") == []
    with pytest.raises(IdentityError):
        resolve(Headers({"X-Session-ID": "x" * 300}), {}, "c")


def test_api_key_table() -> None:
    table = parse_key_table("k1=acme, k2=acme,k3=beta")
    tenants = TenantMap(table)
    assert tenants.tenant("Bearer k1") == "acme" and tenants.tenant("bearer k3") == "beta"
    for bad in (None, "", "Bearer", "Bearer nope", "Basic k1"):
        with pytest.raises(Unauthorized):
            tenants.tenant(bad)
    assert TenantMap({}).tenant(None) == "" and TenantMap({}).tenant("Bearer anything") == ""
    with pytest.raises(ValueError):
        parse_key_table("k1")
    with pytest.raises(ValueError):
        parse_key_table("k1=a/b")


@given(
    st.lists(st.text(alphabet="ab", max_size=4), min_size=1, max_size=8),
    st.lists(st.text(alphabet="ab", min_size=1, max_size=3), max_size=2),
)
@example(pieces=["ba", "a"], stops=["a", "baa"])  # a short stop matches while a longer one, begun earlier, is open
@example(pieces=["ab"], stops=["b", "aba"])  # the same, found only when the held text is flushed
def test_stop_text_equals_cutting_the_whole_text(pieces: list[str], stops: list[str]) -> None:
    whole = "".join(pieces)
    cuts = [i for i in (whole.find(s) for s in stops) if i >= 0]
    expected = whole[: min(cuts)] if cuts else whole
    stop = StopText(stops)
    out = "".join(stop.feed(p) for p in pieces) + stop.flush()
    assert out == expected
    assert stop.done == bool(cuts)


def test_parse_chat_maps_fields_and_rejects_the_unsupported() -> None:
    call = parse_chat(
        {
            "model": "m",
            "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]},
            ],
            "max_tokens": 7,
            "max_completion_tokens": 9,
            "temperature": 0,
            "stop": "x",
            "seed": 3,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        default_max_tokens=512,
    )
    assert [(m.role, m.content) for m in call.messages] == [("system", "be brief"), ("user", "hi there")]
    assert call.max_tokens == 9 and call.temperature == 0.0 and call.stop == ["x"] and call.include_usage
    assert call.seed == 3
    assert parse_chat({"model": "m", "messages": [{"role": "user", "content": "x"}]}, 512).max_tokens == 512
    assert parse_completion({"model": "m", "prompt": ["p"]}).max_tokens == 16
    base = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    for extra in [
        {"n": 3},
        {"top_p": 0.5},
        {"presence_penalty": 1},
        {"logit_bias": {"1": 2}},
        {"response_format": {"type": "json_object"}},
        {"messages": [{"role": "tool", "content": "x"}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        {"whatever": 1},
    ]:
        with pytest.raises(ApiError) as info:
            parse_chat({**base, **extra}, 512)
        assert info.value.status == 400 and info.value.code == "unsupported_parameter", extra
    for extra in [{"messages": []}, {"model": ""}, {"stop": [1]}, {"stream_options": {"include_usage": True}}]:
        with pytest.raises(ApiError) as info:
            parse_chat({**base, **extra}, 512)
        assert info.value.status == 400, extra


def test_mesh_errors_map_to_http_statuses() -> None:
    assert mesh_error("bad_max_tokens", "x").status == 400
    assert mesh_error("prompt_too_long", "x").status == 400
    assert mesh_error("no_engine", "x").status == 503
    assert mesh_error("rate_limited", "x").status == 429
    assert mesh_error("rate_limited", "x").body()["error"]["type"] == "rate_limit_error"
    assert mesh_error("something_new", "x").status == 500

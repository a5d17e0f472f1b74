"""OpenAI's HTTP API on one side, the mesh's call request on the other (pure: no I/O).

Parsing is strict on purpose: a parameter the mesh would silently ignore (``n=2``, ``logprobs``,
``tools``) makes the agent believe something that is not true, so anything not supported is a 400
naming the parameter. Bodies are decoded with msgspec (as the wire is), not pydantic.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import msgspec

from autellix.proto import ErrorCode, Message

#: chat parameters the gateway accepts (others: 400 unsupported_parameter)
CHAT_PARAMS = frozenset(
    {
        "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stream",
        "stream_options", "stop", "seed", "user", "session_id", "presence_penalty", "frequency_penalty",
        "logprobs", "top_logprobs", "logit_bias", "tools", "tool_choice", "parallel_tool_calls",
        "response_format", "ignore_eos",
    }
)  # fmt: skip
COMPLETION_PARAMS = frozenset(
    {
        "model", "prompt", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop",
        "seed", "user", "session_id", "presence_penalty", "frequency_penalty", "logprobs", "logit_bias",
        "echo", "suffix", "best_of", "ignore_eos",
    }
)  # fmt: skip
#: OpenAI's default for /v1/completions
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


class ApiError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, code: str, type_: str = "", param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.type = type_ or _TYPE_BY_STATUS.get(status, "api_error")
        self.param = param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    429: "rate_limit_error",
    500: "api_error",
    503: "service_unavailable",
    504: "timeout",
}

#: mesh error code -> HTTP status
STATUS_BY_CODE = {
    ErrorCode.BAD_JSON: 400,
    ErrorCode.BAD_FIELD: 400,
    ErrorCode.MISSING_PROGRAM_ID: 400,
    ErrorCode.BAD_MAX_TOKENS: 400,
    ErrorCode.EMPTY_MESSAGES: 400,
    ErrorCode.PROMPT_TOO_LONG: 400,
    ErrorCode.NO_ENGINE: 503,
    ErrorCode.ENGINE_STOPPED: 503,
    ErrorCode.ABORTED: 500,
    ErrorCode.INTERNAL: 500,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.DEADLINE_EXCEEDED: 504,
    "retries_exhausted": 503,  # the Python client gave up resubmitting (schedulers or engines gone)
    "timeout": 504,  # no message within the gateway's call timeout
}


def mesh_error(code: str, message: str) -> ApiError:
    """The HTTP error for a mesh error code (unknown codes are 500s)."""
    return ApiError(STATUS_BY_CODE.get(code, 500), message, code)


def bad(message: str, param: str | None = None, code: str = "invalid_request") -> ApiError:
    return ApiError(400, message, code, param=param)


def unsupported(param: str, why: str) -> ApiError:
    return ApiError(400, f"'{param}' is not supported: {why}", "unsupported_parameter", param=param)


@dataclass(frozen=True, slots=True)
class ParsedCall:
    """What the mesh is asked to do, plus what only the gateway handles (stop strings, usage)."""

    model: str
    messages: list[Message]
    prompt: str | None
    max_tokens: int
    temperature: float
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool
    ignore_eos: bool
    #: the decoded body (identity reads ``session_id`` / ``user`` from it)
    body: dict[str, Any]


def decode_body(raw: bytes) -> dict[str, Any]:
    try:
        body = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise bad(f"the body is not valid JSON: {exc}", code="bad_json") from None
    if not isinstance(body, dict):
        raise bad("the body must be a JSON object", code="bad_json")
    return body


def _get(body: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    value = body.get(key, default)
    if value is None:
        return default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, float)):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise bad(f"'{key}' must be of type {names}", param=key)
    return value


def _common(body: dict[str, Any], allowed: frozenset[str], default_max_tokens: int) -> dict[str, Any]:
    """Checks shared by chat and completions; returns the fields both pass to the mesh."""
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise unsupported(unknown[0], "the gateway does not know this parameter")
    model = _get(body, "model", str, "")
    if not model:
        raise bad("'model' is required (GET /v1/models lists the models served)", param="model")
    n = _get(body, "n", int, 1)
    if n != 1:
        raise unsupported("n", "only n=1 (one choice per call)")
    top_p = _get(body, "top_p", float, 1.0)
    if top_p != 1.0:
        raise unsupported("top_p", "the engines sample from the full distribution (top_p=1)")
    for penalty in ("presence_penalty", "frequency_penalty"):
        if _get(body, penalty, float, 0.0) != 0.0:
            raise unsupported(penalty, "the engines apply no penalties (0 only)")
    if _get(body, "logit_bias", dict, {}):
        raise unsupported("logit_bias", "the engines apply no logit bias")
    temperature = _get(body, "temperature", float, 1.0)  # OpenAI's default
    if not 0.0 <= temperature <= 2.0:
        raise bad("'temperature' must be between 0 and 2", param="temperature")
    seed = _get(body, "seed", int, None)
    stop_value = body.get("stop")
    if stop_value is None:
        stop: list[str] = []
    elif isinstance(stop_value, str):
        stop = [stop_value]
    elif isinstance(stop_value, list) and all(isinstance(s, str) for s in stop_value) and len(stop_value) <= 4:
        stop = list(stop_value)
    else:
        raise bad("'stop' must be a string or a list of at most 4 strings", param="stop")
    stream = _get(body, "stream", bool, False)
    options = _get(body, "stream_options", dict, {})
    if options and not stream:
        raise bad("'stream_options' is only allowed with stream=true", param="stream_options")
    if set(options) - {"include_usage"}:
        raise unsupported("stream_options", "only include_usage")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise bad("'stream_options.include_usage' must be a boolean", param="stream_options")
    return {
        "model": model,
        "temperature": temperature,
        "seed": seed,
        "stop": stop,
        "stream": stream,
        "include_usage": include_usage,
        "ignore_eos": _get(body, "ignore_eos", bool, False),
        "max_tokens": default_max_tokens,
    }


def _text_content(content: Any, index: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise unsupported(f"messages[{index}].content", "only text content parts")
            parts.append(part["text"])
        return "".join(parts)
    raise bad(f"messages[{index}].content must be a string or a list of text parts", param="messages")


def parse_chat(body: dict[str, Any], default_max_tokens: int) -> ParsedCall:
    common = _common(body, CHAT_PARAMS, default_max_tokens)
    if _get(body, "logprobs", bool, False) or body.get("top_logprobs") is not None:
        raise unsupported("logprobs", "the engines do not return log probabilities")
    if _get(body, "tools", list, []):
        raise unsupported("tools", "tool definitions do not reach the chat template yet")
    if body.get("tool_choice") not in (None, "none"):
        raise unsupported("tool_choice", "tool definitions do not reach the chat template yet")
    fmt = _get(body, "response_format", dict, {})
    if fmt and fmt.get("type") != "text":
        raise unsupported("response_format", "only {'type': 'text'}")
    for key in ("max_completion_tokens", "max_tokens"):  # the newer name wins
        value = _get(body, key, int)
        if value is not None:
            common["max_tokens"] = value
            break
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise bad("'messages' must be a non-empty list", param="messages")
    messages = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad(f"messages[{i}] must be an object with a 'role'", param="messages")
        role = m["role"]
        if role == "developer":
            role = "system"  # OpenAI's newer name for the system role
        if role not in ("system", "user", "assistant"):
            raise unsupported(f"messages[{i}].role", f"role {role!r} (system, developer, user, assistant only)")
        if m.get("tool_calls"):
            raise unsupported(f"messages[{i}].tool_calls", "tool calls do not reach the chat template yet")
        messages.append(Message(role=role, content=_text_content(m.get("content") or "", i)))
    return ParsedCall(messages=messages, prompt=None, body=body, **common)


def parse_completion(body: dict[str, Any]) -> ParsedCall:
    common = _common(body, COMPLETION_PARAMS, COMPLETIONS_DEFAULT_MAX_TOKENS)
    common["max_tokens"] = _get(body, "max_tokens", int, COMPLETIONS_DEFAULT_MAX_TOKENS)
    if body.get("logprobs") is not None:
        raise unsupported("logprobs", "the engines do not return log probabilities")
    if _get(body, "echo", bool, False):
        raise unsupported("echo", "the prompt is not echoed")
    if body.get("suffix") is not None:
        raise unsupported("suffix", "no insertion mode")
    if _get(body, "best_of", int, 1) != 1:
        raise unsupported("best_of", "only best_of=1")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise unsupported("prompt", "one prompt string per request (no batches, no token ids)")
    return ParsedCall(messages=[], prompt=prompt, body=body, **common)


# -- responses ------------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def chat_completion(call_id: str, model: str, text: str, finish_reason: str, use: dict[str, int]) -> dict[str, Any]:
    return {
        "id": call_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason,
                "logprobs": None,
            }
        ],
        "usage": use,
    }


def text_completion(call_id: str, model: str, text: str, finish_reason: str, use: dict[str, int]) -> dict[str, Any]:
    return {
        "id": call_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}],
        "usage": use,
    }


class ChunkWriter:
    """Server-sent events for one streaming call: ``data: <json>\\n\\n`` per chunk, ``data: [DONE]``."""

    __slots__ = ("_base", "_chat", "_encode", "_role_sent", "_usage_field")

    def __init__(self, call_id: str, model: str, chat: bool, include_usage: bool) -> None:
        self._chat = chat
        self._base: dict[str, Any] = {
            "id": call_id,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": model,
        }
        self._usage_field = include_usage  # OpenAI: with include_usage every chunk carries "usage": null
        self._encode = msgspec.json.Encoder().encode
        self._role_sent = False

    def _event(self, choices: list[dict[str, Any]], use: dict[str, int] | None = None) -> bytes:
        chunk = dict(self._base, choices=choices)
        if self._usage_field:
            chunk["usage"] = use
        return b"data: " + self._encode(chunk) + b"\n\n"

    def text(self, text: str, finish_reason: str | None = None) -> bytes:
        if not self._chat:
            return self._event([{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}])
        delta: dict[str, str] = {"content": text}
        if not self._role_sent:
            delta = {"role": "assistant", "content": text}
            self._role_sent = True
        return self._event([{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}])

    def finish(self, finish_reason: str, use: dict[str, int]) -> bytes:
        out = self.text("", finish_reason)
        if self._usage_field:
            out += self._event([], use)
        return out + b"data: [DONE]\n\n"

    def error(self, error: ApiError) -> bytes:
        """An error after the stream has started (the status line is gone): an event, then [DONE]."""
        return b"data: " + self._encode(error.body()) + b"\n\ndata: [DONE]\n\n"

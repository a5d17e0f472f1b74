from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

from autellix.services.nats_config import NATS_SETTINGS, NatsConfig
from autellix.services.settings import Setting, from_env, parse_finite, parse_port


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    nats: NatsConfig = field(default_factory=NatsConfig)
    #: HTTP listen address and port (0 = any free port); `autellix up` uses 127.0.0.1
    host: str = "0.0.0.0"
    port: int = 8000
    #: max_tokens for a chat call that names none (OpenAI's default is "up to the context")
    default_max_tokens: int = 512
    #: longest wait for the next message of a call
    call_timeout_s: float = 300.0
    #: API key -> tenant table, ``key=tenant,...`` or ``@file`` (empty: open, no keys needed)
    api_keys: str = ""

    SETTINGS: ClassVar[tuple[Setting, ...]] = (
        *NATS_SETTINGS,
        Setting("host", "AUTELLIX_GATEWAY_HOST", "--host", str, "HTTP listen address"),
        Setting("port", "AUTELLIX_GATEWAY_PORT", "--port", parse_port, "HTTP port (0 = any free)"),
        Setting("default_max_tokens", "AUTELLIX_GATEWAY_DEFAULT_MAX_TOKENS", "--default-max-tokens", int,
                "`max_tokens` of a chat call that names none"),
        Setting("call_timeout_s", "AUTELLIX_GATEWAY_CALL_TIMEOUT_S", "--call-timeout-s", parse_finite,
                "longest wait for a call's next message (then 504)"),
        # a secret: no flag, so that it never shows in a process list
        Setting("api_keys", "AUTELLIX_API_KEYS", None, str,
                "`key=tenant,...` or `@file`; see API keys and tenants", default_text="none (open)"),
    )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> GatewayConfig:
        return from_env(cls, env)

    def redacted(self) -> dict[str, object]:
        """The config for the start-up log line: API keys are secrets, only their count is logged."""
        out: dict[str, object] = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["nats"] = self.nats.for_log()
        out["api_keys"] = "(file)" if self.api_keys.startswith("@") else f"{self.api_keys.count('=')} key(s)"
        return out

from __future__ import annotations

import os
from dataclasses import dataclass

from autellix.proto import DEFAULT_ROOT
from autellix.services.nats_conn import DEFAULT_NATS_URL


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    nats_url: str = DEFAULT_NATS_URL
    root: str = DEFAULT_ROOT
    #: HTTP listen address and port (0 = any free port); `autellix up` uses 127.0.0.1
    host: str = "0.0.0.0"
    port: int = 8000
    #: max_tokens for a chat call that names none (OpenAI's default is "up to the context")
    default_max_tokens: int = 512
    #: longest wait for the next message of a call
    call_timeout_s: float = 300.0
    #: API key -> tenant table, ``key=tenant,...`` or ``@file`` (empty: open, no keys needed)
    api_keys: str = ""

    @classmethod
    def from_env(cls) -> GatewayConfig:
        env = os.environ
        d = cls()
        return cls(
            nats_url=env.get("AUTELLIX_NATS", DEFAULT_NATS_URL),
            root=env.get("AUTELLIX_ROOT", DEFAULT_ROOT),
            host=env.get("AUTELLIX_GATEWAY_HOST", d.host),
            port=int(env.get("AUTELLIX_GATEWAY_PORT", d.port)),
            default_max_tokens=int(env.get("AUTELLIX_GATEWAY_DEFAULT_MAX_TOKENS", d.default_max_tokens)),
            call_timeout_s=float(env.get("AUTELLIX_GATEWAY_CALL_TIMEOUT_S", d.call_timeout_s)),
            api_keys=env.get("AUTELLIX_API_KEYS", d.api_keys),
        )

    def redacted(self) -> dict[str, object]:
        """The config for the start-up log line: API keys are secrets, only their count is logged."""
        out: dict[str, object] = {k: getattr(self, k) for k in self.__slots__}
        out["api_keys"] = "(file)" if self.api_keys.startswith("@") else f"{self.api_keys.count('=')} key(s)"
        return out

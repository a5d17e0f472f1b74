"""Where and how every service and client reaches NATS: one struct, embedded in each service's config.

``urls`` lists the servers (several for a cluster: a connection fails over between them); ``creds``
names a credentials file (:mod:`autellix.services.auth`: one line, the URL with the identity's user
and password), used instead of ``urls``; ``tls_ca``/``tls_cert``/``tls_key`` give the CA that signs
the servers' certificates and, for mutual TLS, this side's certificate and key. With any of them set
the connection is TLS (a server that requires TLS gets it; ``tls://`` URLs always do).
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from autellix.proto import DEFAULT_ROOT

from .auth import default_credentials_path, read_credentials
from .settings import Setting, from_env, nested, parse_url_list

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"


@dataclass(frozen=True, slots=True)
class NatsConfig:
    #: every server's URL; empty: nats://127.0.0.1:4222 (clients: first the credentials `autellix up` wrote)
    urls: tuple[str, ...] = ()
    #: subject root: every subject of one deployment lives under it
    root: str = DEFAULT_ROOT
    #: a credentials file, used instead of ``urls``
    creds: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    SETTINGS: ClassVar[tuple[Setting, ...]]

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("a TLS client certificate needs its key: give both tls_cert and tls_key, or neither")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> NatsConfig:
        return from_env(cls, env)

    @classmethod
    def at(cls, url: str, root: str = DEFAULT_ROOT) -> NatsConfig:
        """The servers of a (comma-separated) URL list, under ``root``: the plain case, in code."""
        return cls(urls=parse_url_list(url), root=root)

    def server_url(self, client: bool = False) -> str:
        """The URL (comma-separated list) to connect with: the credentials file's, else ``urls``,
        else, for clients only, the credentials ``autellix up`` wrote on this machine, else
        nats://127.0.0.1:4222. Raises OSError/ValueError for an unreadable credentials file."""
        if self.creds:
            return read_credentials(self.creds)
        if self.urls:
            return ",".join(self.urls)
        default = default_credentials_path()
        if client and default.is_file():
            try:
                return read_credentials(default)
            except (OSError, ValueError):
                pass  # a stale or foreign file: fall back to the open default
        return DEFAULT_NATS_URL

    def tls_context(self) -> ssl.SSLContext | None:
        """The TLS context for the connection, or None when no TLS file is configured."""
        if not (self.tls_ca or self.tls_cert):
            return None
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.tls_ca)
        if self.tls_cert and self.tls_key:
            context.load_cert_chain(self.tls_cert, self.tls_key)
        return context

    def for_log(self) -> dict[str, object]:
        """What a start-up log line shows: file names, never a credential."""
        from .auth import redact_url

        return {
            "urls": redact_url(",".join(self.urls)) if self.urls else "(default)",
            "root": self.root,
            "creds": str(Path(self.creds)) if self.creds else None,
            "tls": bool(self.tls_ca or self.tls_cert),
        }


NatsConfig.SETTINGS = (
    Setting("urls", "AUTELLIX_NATS", "--nats", parse_url_list,
            "NATS server URL, or a comma list of a cluster's servers (a URL may carry `user:password@`; logs "
            "redact it)", default_text=f"`{DEFAULT_NATS_URL}`"),
    Setting("creds", "AUTELLIX_NATS_CREDS", "--creds", str,
            "a credentials file (one line: `nats://user:password@host:port`), used instead of the URL",
            default_text="clients: the file `autellix up` wrote"),
    Setting("root", "AUTELLIX_ROOT", "--root", str, "subject root", default_text=f"`{DEFAULT_ROOT}`"),
    Setting("tls_ca", "AUTELLIX_NATS_TLS_CA", "--tls-ca", str, "CA certificate (PEM) the servers' certificates "
            "are checked against; the connection is TLS"),
    Setting("tls_cert", "AUTELLIX_NATS_TLS_CERT", "--tls-cert", str, "this side's TLS certificate (PEM), for a "
            "server that verifies clients"),
    Setting("tls_key", "AUTELLIX_NATS_TLS_KEY", "--tls-key", str, "the key of `--tls-cert` (PEM)"),
)
#: the NATS settings as they sit in a service's config (its ``nats`` field)
NATS_SETTINGS = nested("nats", NatsConfig.SETTINGS)


def config_for_log(config: object) -> dict[str, object]:
    """A service config as its start-up log line shows it: the NATS part without credentials."""
    import dataclasses

    out: dict[str, object] = dataclasses.asdict(config)  # type: ignore[call-overload]
    out["nats"] = config.nats.for_log()  # type: ignore[attr-defined]
    return out

"""One way to connect to NATS: reconnect forever, log connection changes."""

from __future__ import annotations

from collections.abc import Callable

from nats.aio.client import Client as NATS

from .auth import inbox_prefix, redact_url, url_user
from .log_throttle import LogThrottle
from .logs import get_logger
from .nats_config import DEFAULT_NATS_URL, NatsConfig

__all__ = ["DEFAULT_NATS_URL", "connect"]


async def connect(
    nats: NatsConfig | str,
    name: str,
    fail_fast: bool = False,
    on_closed: Callable[[], None] | None = None,
    on_reconnected: Callable[[], None] | None = None,
    client: bool = False,
    on_disconnected: Callable[[], None] | None = None,
) -> NATS:
    """Connect to NATS. Services wait for the broker forever; with ``fail_fast`` (clients) the first
    connection gives up after a few tries. Once connected, both reconnect forever, but nats-py closes
    a connection for good on some protocol errors from the server: ``on_closed`` then tells the
    service (which fails its health unless it is the one closing). ``on_reconnected`` runs once the
    connection is back, its subscriptions replayed and what was buffered meanwhile sent;
    ``on_disconnected`` when the connection is lost (not when it is closed on purpose).

    A URL with ``user:password@`` connects as that identity, with the inbox prefix its
    permissions grant (:mod:`autellix.services.auth`); logs show the URL with the password
    redacted.

    ``nats``: the config (servers or credentials file, TLS), or a plain URL (list). ``client``: with
    no server configured, use the credentials ``autellix up`` wrote (:meth:`NatsConfig.server_url`)."""
    config = NatsConfig.at(nats) if isinstance(nats, str) else nats
    url = config.server_url(client=client)
    log = get_logger(name)
    shown = redact_url(url)
    nc = NATS()

    async def disconnected() -> None:
        if not (nc.is_closed or nc.is_draining):
            log.warning("nats disconnected", url=shown)
            if on_disconnected is not None:
                on_disconnected()

    async def closed() -> None:
        if on_closed is not None:
            on_closed()

    async def reconnected() -> None:
        log.info("nats reconnected", url=shown)
        if on_reconnected is not None:
            on_reconnected()

    throttle = LogThrottle()

    async def error(exc: Exception) -> None:
        # one line per kind of error now and then: a slow consumer or a refused reconnect repeats
        if nc.is_connected or nc.is_reconnecting or not fail_fast:
            throttle.log(log, "nats error", key=type(exc).__name__, error=str(exc)[:300] or type(exc).__name__)

    await nc.connect(
        [u.strip() for u in url.split(",")],  # a cluster: every node, failed over between
        name=name,
        max_reconnect_attempts=2 if fail_fast else -1,
        reconnect_time_wait=0.5,  # pyright: ignore[reportArgumentType]  (nats-py annotates int, takes seconds)
        connect_timeout=5,
        allow_reconnect=True,
        disconnected_cb=disconnected,
        reconnected_cb=reconnected,
        closed_cb=closed,
        error_cb=error,
        inbox_prefix=inbox_prefix(url_user(url)),
        tls=config.tls_context(),
    )
    nc.options["max_reconnect_attempts"] = -1  # nats-py reads this on every reconnect
    return nc

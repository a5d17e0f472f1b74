"""Service lifecycle: start (subscribe + flush = ready), wait for SIGTERM/SIGINT, stop in order.

A service implements :class:`Service`. ``stop`` is the same path a signal takes, so tests stop
services exactly as production does. A second signal during shutdown exits at once.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Sequence
from typing import Protocol

from .logs import get_logger


class Service(Protocol):
    name: str

    async def start(self) -> None:
        """Connect, subscribe and flush: when this returns the service is ready."""

    async def stop(self) -> None:
        """Stop taking work, drain or hand back in-flight work, close the connection."""


def install_signal_handlers(stop_event: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    log = get_logger("lifecycle")
    first_at: list[float] = []

    def on_signal(signum: int) -> None:
        if stop_event.is_set():
            # The same signal often arrives twice at once (a terminal's process group, a wrapper
            # forwarding it): only a second signal a moment later means "exit now".
            if first_at and time.monotonic() - first_at[0] > 1.0:
                log.warning("second signal: exiting now", signal=signal.Signals(signum).name)
                os._exit(130)
            return
        log.info("signal received: shutting down", signal=signal.Signals(signum).name)
        first_at.append(time.monotonic())
        stop_event.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)


async def stop_all(services: Sequence[Service]) -> None:
    """Stop services in the given order, each even if an earlier one failed to stop."""
    log = get_logger("lifecycle")
    for service in services:
        try:
            await service.stop()
        except Exception:
            log.exception("service failed to stop cleanly", target=service.name)


async def run_until_signal(services: Sequence[Service], stop_order: Sequence[Service] | None = None) -> None:
    stop_event = asyncio.Event()
    install_signal_handlers(stop_event)
    started: list[Service] = []
    try:
        for service in services:
            await service.start()
            started.append(service)
        await stop_event.wait()
    finally:
        order = [s for s in (stop_order or list(reversed(started))) if s in started]
        await stop_all(order)

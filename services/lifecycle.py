"""Service lifecycle: start (subscribe + flush = ready), wait for SIGTERM/SIGINT, stop in order.

A service implements :class:`Service`. ``stop`` is the same path a signal takes, so tests stop
services exactly as production does. A second signal during shutdown exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Sequence
from typing import Any, Protocol

from .logs import get_logger


class Health:
    """Whether a service can still do its work. A service whose work loop died or whose broker
    connection closed for good calls :meth:`fail`; the process then stops and exits non-zero, so
    compose or systemd restarts it, instead of staying up and counted healthy while doing nothing."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.reason = ""
        self.failed = asyncio.Event()

    @property
    def ok(self) -> bool:
        return not self.failed.is_set()

    def fail(self, reason: str) -> None:
        if self.failed.is_set():
            return
        self.reason = reason
        get_logger("lifecycle").error("service cannot do its work: stopping", target=self.service, reason=reason)
        self.failed.set()


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


#: how long one service's stop may take when it names no budget of its own (``stop_timeout_s``)
DEFAULT_STOP_TIMEOUT_S = 15.0


async def _stop_one(service: Service) -> None:
    """Stop a service within its budget (its drain timeout and a grace), whatever state its
    connection is in: a stop stuck on a broker that refuses or is gone is abandoned and logged."""
    log = get_logger("lifecycle")
    budget = float(getattr(service, "stop_timeout_s", DEFAULT_STOP_TIMEOUT_S))
    try:
        await asyncio.wait_for(service.stop(), timeout=budget)
    except TimeoutError:
        log.error("service did not stop within its budget: abandoned", target=service.name, budget_s=budget)
    except Exception:
        log.exception("service failed to stop cleanly", target=service.name)


async def stop_all(services: Sequence[Service]) -> None:
    """Stop services in the given order, each even if an earlier one failed to stop."""
    for service in services:
        await _stop_one(service)


async def stop_stages(stages: Sequence[Sequence[Service]]) -> None:
    """Stop stage after stage; the services of one stage (several engines) stop in parallel, so a
    mesh's shutdown takes one drain timeout, not one per engine."""
    for stage in stages:
        await asyncio.gather(*(_stop_one(service) for service in stage))


def failure_events(services: Sequence[object]) -> list[asyncio.Event]:
    return [h.failed for s in services if isinstance(h := getattr(s, "health", None), Health)]


async def wait_for_stop(stop_event: asyncio.Event, services: Sequence[object]) -> bool:
    """Wait for a signal or for a service to fail; True when a service failed."""
    waits = [asyncio.ensure_future(e.wait()) for e in [stop_event, *failure_events(services)]]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
    return any(not h.ok for s in services if isinstance(h := getattr(s, "health", None), Health))


async def abandon(starting: asyncio.Future[None]) -> None:
    """Cancel a start that is still connecting. Cancel again if it goes on: on Python 3.11 a cancel
    that lands as an inner ``wait_for`` completes is swallowed (seen with nats-py's connect loop)."""
    for _ in range(50):
        starting.cancel()
        done, _ = await asyncio.wait({starting}, timeout=0.1)
        if done:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                starting.result()  # a start that failed as it was cancelled: nothing left to report
            return
    get_logger("lifecycle").error("a start did not end when cancelled: abandoned")


async def start_in_order(services: Sequence[Service], stop_event: asyncio.Event, started: list[Any]) -> bool:
    """Start the services one after another, each appended to ``started`` once it is up; False when
    ``stop_event`` is set first (a start still connecting to a broker that is down or refuses it is
    abandoned, and appended too: its stop closes whatever the start had opened). A failed start
    raises what the service raised."""
    for service in services:
        starting = asyncio.ensure_future(service.start())
        signalled = asyncio.ensure_future(stop_event.wait())
        await asyncio.wait({starting, signalled}, return_when=asyncio.FIRST_COMPLETED)
        signalled.cancel()
        if not starting.done():
            await abandon(starting)
            started.append(service)
            return False
        starting.result()
        started.append(service)
    return True


async def run_until_signal(services: Sequence[Service], stop_order: Sequence[Service] | None = None) -> int:
    """Start the services, run until a signal or a service failure, stop them; the exit status
    (1 when a service failed). A signal while a service is still starting (a broker that is down or
    refuses it) stops at once instead of waiting for the start."""
    stop_event = asyncio.Event()
    install_signal_handlers(stop_event)
    started: list[Service] = []
    try:
        if not await start_in_order(services, stop_event, started):
            return 130
        failed = await wait_for_stop(stop_event, started)
        return 1 if failed else 0
    finally:
        order = [s for s in (stop_order or list(reversed(started))) if s in started]
        await stop_all(order)

"""Shared fixtures: one real nats-server per session, a fresh subject root per test, and an
in-process mesh (tracker, scheduler, engines) stopped through the same path SIGTERM takes."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from meshkit import Mesh, start_mesh, stop_mesh

from autellix.services.embedded_nats import EmbeddedNats
from autellix.services.logs import configure_logging

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
configure_logging("warning", json=True)


@pytest.fixture(scope="session")
def nats_url() -> Iterator[str]:
    with EmbeddedNats(port=0) as server:
        yield server.url


@pytest.fixture(scope="session")
def hf_backend():  # type: ignore[no-untyped-def]
    """The real SmolLM2-135M behind the `hf` backend, loaded once per session."""
    from autellix.engine.hf_backend import HFBackend
    from autellix.engine.model_store import resolve_model

    return HFBackend(resolve_model(None), max_batch=16, kv_capacity_tokens=16_384, swap_pool_bytes=256 << 20)


@pytest.fixture
def root() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def mesh(nats_url: str, root: str) -> AsyncIterator[Mesh]:
    m = await start_mesh(nats_url, root)
    try:
        yield m
    finally:
        await stop_mesh(m)

"""What the integration tests share beyond tests/conftest.py: the workstation's SDK client for a running gateway."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import RunningGateway

OPEN_CLIENTS: list[openai.OpenAI] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    """Close every SDK client a test made (their sockets would otherwise leak into the next test's warnings)."""
    yield
    while OPEN_CLIENTS:
        OPEN_CLIENTS.pop().close()


def sdk_client(gw: RunningGateway, key: str | None = None, **kw: Any) -> openai.OpenAI:
    """The openai SDK as a workstation uses it: the gateway's URL, a key, the clinic CA, no retries."""
    c = openai.OpenAI(
        base_url=gw.base_url + "/v1",
        api_key=key or gw.key,
        max_retries=0,
        timeout=kw.pop("timeout", 120),
        http_client=httpx.Client(verify=gw.ssl_context()),
        **kw,
    )
    OPEN_CLIENTS.append(c)
    return c

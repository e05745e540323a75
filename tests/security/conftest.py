from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.security.gateway_as_nobody import NobodyGateway, gateway_as_nobody


@pytest.fixture(scope="session")
def nobody_gateway(demo) -> Iterator[NobodyGateway]:
    """The session's real gateway as nobody, secrets in its environment (gateway_as_nobody.py)."""
    with gateway_as_nobody(demo) as gateway:
        yield gateway

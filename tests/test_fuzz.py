"""Schemathesis against the app's own OpenAPI schema: whatever the input, never a 5xx."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

schemathesis = pytest.importorskip("schemathesis")

from adapters.database import Database  # noqa: E402
from adapters.registry import AdapterRules, Registry  # noqa: E402
from adapters.store import AdapterStore  # noqa: E402
from server.app import build_app  # noqa: E402
from server.config import Settings  # noqa: E402
from server.engine import grammar  # noqa: E402
from tests.adapter_files import TINY_BASE, TINY_CONFIG  # noqa: E402
from tests.fakes import FakeEngine, fake_spec  # noqa: E402

pytestmark = pytest.mark.imports("vllm")  # in this process: see tests/conftest.py


def _app():
    state = Path(tempfile.mkdtemp(prefix="fuzz-"))
    # A base folder of its own: fine-tuning's routes need one, and the demo may not be built yet.
    base_dir = state / "base"
    base_dir.mkdir()
    (base_dir / "config.json").write_text(json.dumps(TINY_CONFIG))
    config = Settings(model=str(base_dir), served_model_name="base", state_dir=state, max_cpu_loras=3, max_loras=2)
    registry = Registry(
        FakeEngine(),
        base_name="base",
        base_adapter=fake_spec("__base__", 1),
        max_resident=2,
        catalog=Database(state / "catalog.sqlite3"),
        store=AdapterStore(state / "adapters"),
        rules=AdapterRules(TINY_BASE, 64, 1 << 20),
    )
    app = build_app(config, registry._engine, registry)
    app.state.ready = True
    return app


# Open mode answers local names only (server/http/open_mode.py); the test client's is "testserver".
LOCAL = {"Host": "localhost"}
TGI_ROUTES = {"/", "/generate", "/generate_stream", "/info", "/ping"}


@pytest.fixture(scope="module")
def api_schema():
    """The app's schema, loaded when the test runs: built at import, schemathesis's cases cost every
    xdist worker 3 s while collecting, though one worker runs them (this file is one group:
    tests/conftest.py). The engine's grammar check imports vLLM on first use, which takes longer
    than the client's timeout here; a gateway's engine has it imported already, so it is loaded
    first."""
    grammar.load()
    return schemathesis.openapi.from_asgi("/openapi.json", _app(), headers=LOCAL)


schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.fixture(autouse=True)
def node_id_as_schemathesis_expects(request) -> None:
    """A lazy schema (schemathesis 4.32) reads and rewrites the test's `_nodeid`, which pytest 9.2 no
    longer has: without it the test fails before any case runs. Each operation still reports as a
    subtest of its own, under its method and path."""
    request.node._nodeid = request.node.nodeid


@schema.parametrize()
@settings(  # its cases per operation: the Hypothesis profile's (tests/conftest.py)
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_no_input_gives_a_server_error(case):
    response = case.call(headers=LOCAL)
    assert response.status_code < 500, (case.method, case.path, case.body, response.text)
    if response.status_code < 400:
        return
    body = response.json()
    if case.path in TGI_ROUTES and case.method in ("GET", "POST") and response.status_code not in (404, 405):
        assert is_tgi_error(body), body  # TGI's shape on TGI's routes
    else:
        # The router's 404 and 405 for methods a path lacks come in either shape.
        assert is_openai_error(body) or (case.path in TGI_ROUTES and is_tgi_error(body)), body


def is_tgi_error(body) -> bool:
    return set(body) == {"error", "error_type"} and isinstance(body["error"], str)


def is_openai_error(body) -> bool:
    error = body.get("error")
    return (
        isinstance(error, dict)
        and set(error) == {"message", "type", "param", "code"}
        and isinstance(error["code"], str)
    )

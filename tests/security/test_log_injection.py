"""Log lines cannot be forged or blown up: control characters are escaped in text logs, and long
values are cut, in both formats."""

from __future__ import annotations

import io
import json
import logging
import re

import pytest

from server.ops import logs
from tests.security.hostile import completion, hostile_world

TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ \S+: ")
FORGED = "2026-01-01 00:00:00,000 INFO lora_gateway.requests: POST /v1/completions 200 admin 1.0 ms"


@pytest.fixture
def log_lines():
    """Configure logging as `lora-gateway serve --log-format FMT` does; returns its lines so far."""
    root = logging.getLogger()
    level = root.level
    buffer = io.StringIO()

    def configure(fmt: str):
        logs.configure_logging("info", fmt)
        handler = next(h for h in root.handlers if isinstance(h, logs._GatewayHandler))
        handler.setStream(buffer)
        return lambda: buffer.getvalue().splitlines()

    yield configure
    for handler in [h for h in root.handlers if isinstance(h, logs._GatewayHandler)]:
        root.removeHandler(handler)
    root.setLevel(level)


async def test_a_model_name_with_a_newline_cannot_forge_a_text_log_line(tmp_path, log_lines):
    lines = log_lines("text")
    async with hostile_world(tmp_path) as gw:
        response = await gw.client.post("/v1/completions", json=completion("ghost\n" + FORGED), headers=gw.tenant)
        assert response.status_code == 404
    written = lines()
    assert written and all(TEXT_LINE.match(line) for line in written), written
    request_line = next(line for line in written if "POST /v1/completions 404" in line)
    assert "ghost\\n2026-01-01" in request_line


async def test_a_4mb_model_name_writes_no_4mb_line(tmp_path, log_lines):
    for fmt in ("text", "json"):
        lines = log_lines(fmt)
        async with hostile_world(tmp_path / fmt) as gw:
            response = await gw.client.post("/v1/completions", json=completion("m" * 4_000_000), headers=gw.tenant)
            assert response.status_code in (400, 404) and len(response.content) < 400
        assert lines() and max(len(line) for line in lines()) < 2000, fmt


def test_c0_and_c1_controls_are_escaped_in_the_message_and_its_args(log_lines):
    lines = log_lines("text")
    logging.getLogger("lora_gateway.test").warning("adapter %s said\r%s", "a\nb\x00c\x1b[2Jd", "e\x85f\u2028g\tend")
    (line,) = lines()
    assert line.endswith("adapter a\\nb\\x00c\\x1b[2Jd said\\re\\x85f\\u2028g\\tend"), line


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_long_values_are_cut_with_an_ellipsis(log_lines, fmt):
    lines = log_lines(fmt)
    logging.getLogger("lora_gateway.test").info("model %s: %d", "n" * 100_000, 404, extra={"adapter": "a" * 100_000})
    (line,) = lines()
    assert len(line) < 2000
    message = json.loads(line)["message"] if fmt == "json" else line
    assert re.search(r"model n{100,}…: 404$", message), message[-100:]
    if fmt == "json":
        assert json.loads(line)["adapter"].endswith("…")

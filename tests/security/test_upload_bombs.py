"""Hostile uploads through POST /v1/adapters: each is refused in under a second, in OpenAI's
error shape, with the gateway's peak memory growing by less than 64 MiB.

Each is small on the wire and was expensive before uploads were bounded while read: CPython's
tarfile reads a PAX header whole and parses it in quadratic time and memory, json recurses once
per level of nesting (a RecursionError was a 500), and tarfile keeps every member it has seen.
"""

from __future__ import annotations

import time

import pytest

from tests.adapter_files import make_adapter
from tests.security.bombs import (
    directory_bomb,
    gzip_bomb,
    nested_json,
    pax_bomb,
    peak_rss_growth,
    safetensors_with_header,
)

MAX_SECONDS = 1.0
MAX_RSS_GROWTH = 64 * 1024 * 1024
BOMBS = ["pax-header", "nested-config", "nested-safetensors-header", "directory-entries", "gzip-bomb"]


@pytest.fixture(scope="module")
def bombs(tmp_path_factory) -> dict[str, list[tuple[str, bytes]]]:
    """Each bomb as the files of one multipart upload."""
    folder = make_adapter(tmp_path_factory.mktemp("good") / "adapter")
    config, weights = (folder / "adapter_config.json").read_bytes(), (folder / "adapter_model.safetensors").read_bytes()
    return {
        "pax-header": [("adapter.tar", pax_bomb())],
        "nested-config": [("adapter_config.json", nested_json(55 * 1024)), ("adapter_model.safetensors", weights)],
        "nested-safetensors-header": [
            ("adapter_config.json", config),
            ("adapter_model.safetensors", safetensors_with_header(nested_json(50 * 1024))),
        ],
        "directory-entries": [("adapter.tar.gz", directory_bomb(200_000))],
        "gzip-bomb": [("adapter.tar.gz", gzip_bomb(1024))],
    }


@pytest.mark.parametrize("bomb", BOMBS)
async def test_a_bomb_is_refused_fast_in_bounded_memory(full, bombs, bomb, tmp_path):
    files = [("file", (name, data)) for name, data in bombs[bomb]]
    with peak_rss_growth() as growth:
        started = time.perf_counter()
        response = await full.client.post("/v1/adapters", data={"name": "bomb"}, files=files, headers=full.admin)
        seconds = time.perf_counter() - started
    print(
        f"{bomb}: {sum(len(data) for _, data in bombs[bomb])} bytes sent, {response.status_code} in {seconds:.2f} s, "
        f"peak RSS +{growth['bytes'] / 2**20:.1f} MiB: {response.text[:300]}"
    )
    assert response.status_code == 400, response.text
    body = response.json()
    assert list(body) == ["error"] and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["code"] == "invalid_adapter"
    assert seconds < MAX_SECONDS, f"{bomb} took {seconds:.2f} s"
    assert growth["bytes"] < MAX_RSS_GROWTH, f"{bomb} grew peak RSS by {growth['bytes'] / 2**20:.0f} MiB"
    assert full.registry.find("", "bomb") is None
    assert list((tmp_path / "state" / "adapters" / ".staging").iterdir()) == []

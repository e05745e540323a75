"""Real gateways on shared state: two processes on one PostgreSQL catalog and one S3 store, and
one catalog that serves each base model only its own adapters. Outputs are checked against PEFT."""

from __future__ import annotations

import shutil
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
from safetensors.torch import load_file, save_file

from adapters.base_model import fingerprint
from adapters.demo import DEMO_PROMPT
from tests.engine.conftest import ADMIN_KEY, start_gateway, stop_gateway
from tests.engine.reference import PeftReference

pytestmark = pytest.mark.engine

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
IN_FORCE_SECONDS = 2.0
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def reference(demo) -> PeftReference:
    return PeftReference(demo.base, demo.adapters)


def peft_answer(reference: PeftReference, adapter: str | None) -> str:
    return reference.chat(adapter, (("user", DEMO_PROMPT),), MAX_TOKENS)


def ask(url: str, model: str, headers=None) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/chat/completions",
        json={
            "model": model,
            "messages": [{"role": "user", "content": DEMO_PROMPT}],
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
        },
        headers=headers or ADMIN,
        timeout=120,
    )


def answer(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def upload(url: str, name: str, folder: Path) -> httpx.Response:
    files = [("file", (p.name, p.read_bytes())) for p in sorted(folder.iterdir())]
    return httpx.post(f"{url}/v1/adapters", data={"name": name}, files=files, headers=ADMIN, timeout=120)


def within(check, seconds: float = IN_FORCE_SECONDS) -> float:
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > seconds:
            raise AssertionError(f"not in force within {seconds} s")
        time.sleep(0.05)
    return time.monotonic() - started


def start_all(specs: list[tuple[list[str], Path]], base_name: str = "demo", env=None):
    """Start gateways side by side (each engine takes half a minute)."""
    started: dict[int, object] = {}
    errors: list[BaseException] = []

    def one(index: int, args: list[str], log: Path) -> None:
        try:
            started[index] = start_gateway(args, log, base_name=base_name, env=env)
        except BaseException as exc:  # noqa: BLE001 - re-raised below, after the others stop
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i, *spec)) for i, spec in enumerate(specs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        stop_gateway(*started.values())
        raise errors[0]
    return [started[i] for i in range(len(specs))]


def with_readme(folder: Path, dest: Path) -> Path:
    """The same weights under a new content hash, which no gateway has cached yet."""
    shutil.copytree(folder, dest)
    (dest / "README.md").write_text(f"{dest.name}\n")
    return dest


def test_two_gateways_on_one_postgres_catalog_and_s3_store(demo, reference, tmp_path, postgres_server, s3_env):
    postgres_server.start()
    pirate = with_readme(demo.adapters["pirate"], tmp_path / "corsair-pirate")
    poet = with_readme(demo.adapters["poet"], tmp_path / "corsair-poet")
    common = [
        "--demo-dir", str(demo.root), "--admin-key", ADMIN_KEY, "--max-cpu-loras", "4",
        "--catalog-url", postgres_server.new_database(), "--store-url", s3_env.url,
    ]  # fmt: skip
    specs = [([*common, "--state-dir", str(tmp_path / name)], tmp_path / f"{name}.log") for name in ("a", "b")]
    a, b = start_all(specs)
    try:
        # An adapter uploaded through a serves from b, which fetches it from the store.
        assert upload(a.url, "corsair", pirate).status_code == 201
        within(lambda: ask(b.url, "corsair").status_code == 200)
        expected = peft_answer(reference, "pirate")
        assert answer(ask(b.url, "corsair")) == answer(ask(a.url, "corsair")) == expected
        assert "fetched adapter" in b.log_tail(400)  # from the store into b's own cache

        # A tenant and key made through b work on a within 2 s.
        created = httpx.post(f"{b.url}/v1/tenants", json={"name": "acme"}, headers=ADMIN, timeout=30)
        assert created.status_code == 201, created.text
        key = {"Authorization": f"Bearer {created.json()['api_key']}"}
        within(lambda: httpx.get(f"{a.url}/v1/models", headers=key, timeout=10).status_code == 200)

        # Replaced through b: a serves the new content (the poet's files) within 2 s, with parity.
        assert upload(b.url, "corsair", poet).status_code == 201
        within(lambda: answer(ask(a.url, "corsair")) == peft_answer(reference, "poet"), seconds=10)
        assert answer(ask(a.url, "pirate")) == peft_answer(reference, "pirate")
        assert answer(ask(a.url, "demo")) == peft_answer(reference, None)
    finally:
        # A third gateway with a state dir of its own, started into this state, is
        # tests/test_catalog_sync.py's: b's fetch from the store above is the engine's part of it.
        stop_gateway(a, b, wait=False)


def perturbed_copy(base: Path, dest: Path) -> Path:
    """The base model with the same shapes and slightly different weights."""
    shutil.copytree(base, dest)
    weights = dest / "model.safetensors"
    tensors = load_file(weights)
    save_file({name: (t * 1.01 if t.is_floating_point() else t) for name, t in tensors.items()}, weights)
    return dest


def test_a_base_model_serves_only_its_own_adapters_from_a_shared_state_dir(gateway, demo, reference, tmp_path):
    """A gateway of another base model starts on the state dir of the session's gateway, which runs."""
    other_base = perturbed_copy(demo.base, tmp_path / "other-base")
    assert fingerprint(other_base) != fingerprint(demo.base)
    on_b = [
        "--model", str(other_base), "--served-model-name", "demo", "--dtype", "float32",
        "--lora-modules", f"pirate={demo.adapters['pirate']}",
        "--admin-key", ADMIN_KEY, "--state-dir", str(gateway.state_dir),
    ]  # fmt: skip

    # The session's gateway registers an adapter, and does not load it yet: it will read it from
    # the state dir after b has started.
    name = f"corsair-{uuid.uuid4().hex[:8]}"
    assert upload(gateway.url, name, demo.adapters["poet"]).status_code == 201
    try:
        assert f"loaded adapter {name}" not in gateway.log_tail(400)
        (b,) = start_all([(on_b, tmp_path / "b.log")])
        try:
            listed = [m["id"] for m in httpx.get(f"{b.url}/v1/models", headers=ADMIN, timeout=10).json()["data"]]
            assert name not in listed and "poet" not in listed and "pirate" in listed
            refused = ask(b.url, name)
            assert refused.status_code == 404 and refused.json()["error"]["code"] == "model_not_found"
        finally:
            stop_gateway(b, wait=False)

        # b removed nothing of the other base's: its gateway loads the adapter from the state dir
        # now, with parity.
        assert answer(ask(gateway.url, name)) == peft_answer(reference, "poet")
        assert f"loaded adapter {name}" in gateway.log_tail(400)
        assert answer(ask(gateway.url, "pirate")) == peft_answer(reference, "pirate")
    finally:
        httpx.delete(f"{gateway.url}/v1/adapters/{name}", headers=ADMIN, timeout=30)

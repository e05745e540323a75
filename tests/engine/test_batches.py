"""Batches on the demo model, through the official openai client: 50 lines over the base model and
three adapters, each answered exactly as the same request sent directly (greedy); and the README's
example as printed.

Input-file checks, tenancy, limits, cancel, expiry and restarts run over a FakeEngine in
tests/routes/test_batches.py.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

from tests.engine.conftest import ADMIN_KEY

pytestmark = pytest.mark.engine

BATCH_SECONDS = 240
PROMPTS = ("Who are you?", "The sea is", "Tell me a story.", "What is the secret word?", "Hello")


def client_for(url: str, key: str, retries: int = 0) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=retries, timeout=60)


def wait_for(client: openai.OpenAI, batch_id: str, timeout: float = BATCH_SECONDS):
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "expired", "cancelled") or time.monotonic() > deadline:
            return batch
        time.sleep(0.5)


def jsonl(rows) -> io.BytesIO:
    return io.BytesIO("".join(json.dumps(row) + "\n" for row in rows).encode())


@pytest.fixture(scope="module")
def batcher(gateway):
    """A tenant with a composed adapter of its own beside the shared pirate and poet."""
    admin = client_for(gateway.url, ADMIN_KEY)
    card = admin.post("/tenants", body={"name": "batcher"}, cast_to=object)
    tenant = client_for(gateway.url, card["api_key"], retries=4)
    composed = tenant.post(
        "/adapters",
        body={"name": "sea-verse", "compose": {"adapters": ["pirate", "poet"], "weights": [0.7, 0.5], "method": "cat"}},
        cast_to=object,
    )
    assert composed["name"] == "sea-verse"
    return tenant


def test_a_batch_of_50_lines_over_three_adapters_and_the_base_answers_as_direct_requests(batcher):
    models = ("demo", "pirate", "poet", "sea-verse")
    rows = []
    for i in range(50):
        body = {
            "model": models[i % len(models)],
            "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            "temperature": 0,
            "max_tokens": 6 + i % 5,
        }
        rows.append({"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body})
    upload = batcher.files.create(file=("fifty.jsonl", jsonl(rows)), purpose="batch")
    assert upload.purpose == "batch"
    batch = batcher.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h", metadata={"run": "parity"}
    )
    assert batch.status == "validating" and batch.request_counts.total == 50
    assert batch.id in [b.id for b in batcher.batches.list(limit=5).data]
    done = wait_for(batcher, batch.id)
    assert done.status == "completed", done
    assert (done.request_counts.completed, done.request_counts.failed) == (50, 0)
    assert done.error_file_id is None and done.metadata == {"run": "parity"}
    results = [json.loads(line) for line in batcher.files.content(done.output_file_id).text.splitlines()]
    assert [r["custom_id"] for r in results] == [row["custom_id"] for row in rows]
    for result, row in zip(results, rows, strict=True):
        direct = batcher.chat.completions.create(**row["body"])
        body = result["response"]["body"]
        assert result["response"]["status_code"] == 200
        assert body["model"] == row["body"]["model"]
        assert body["choices"][0]["message"]["content"] == direct.choices[0].message.content, row
        assert body["usage"]["completion_tokens"] == direct.usage.completion_tokens
    # Lines 0, 5, 10 and 15 ask each model the same: the adapters took effect, each its own.
    same_question = {results[i]["response"]["body"]["choices"][0]["message"]["content"] for i in (0, 5, 10, 15)}
    assert len(same_question) >= 3, same_question


def test_cancel_through_the_client_keeps_what_was_done(batcher):
    rows = [
        {
            "custom_id": f"c{i}",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": "poet", "prompt": "The sea is", "max_tokens": 64, "temperature": 0, "ignore_eos": True},
        }
        for i in range(80)  # far more than run before the cancel
    ]
    upload = batcher.files.create(file=("long.jsonl", jsonl(rows)), purpose="batch")
    batch = batcher.batches.create(input_file_id=upload.id, endpoint="/v1/completions", completion_window="24h")
    deadline = time.monotonic() + 60
    while batcher.batches.retrieve(batch.id).request_counts.completed < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    started = time.monotonic()
    cancelled = batcher.batches.cancel(batch.id)
    assert time.monotonic() - started < 10
    assert cancelled.status == "cancelled", cancelled
    counts = cancelled.request_counts
    assert 2 <= counts.completed < 80 and counts.failed == 0
    kept = batcher.files.content(cancelled.output_file_id).text.splitlines()
    assert len(kept) == counts.completed


def test_another_tenant_gets_404_through_the_client(gateway, batcher):
    batch = batcher.batches.list(limit=1).data[0]
    admin = client_for(gateway.url, ADMIN_KEY)
    card = admin.post("/tenants", body={"name": "stranger"}, cast_to=object)
    stranger = client_for(gateway.url, card["api_key"])
    with pytest.raises(openai.NotFoundError):
        stranger.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        stranger.batches.cancel(batch.id)
    assert stranger.batches.list().data == []


def test_the_readme_example_runs_as_printed(gateway):
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme[readme.index("## Batches") :]
    script = section[section.index("python - <<'PY'\n") + len("python - <<'PY'\n") : section.index("\nPY\n")]
    env = {**os.environ, "OPENAI_BASE_URL": f"{gateway.url}/v1", "OPENAI_API_KEY": ADMIN_KEY}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=BATCH_SECONDS)
    assert run.returncode == 0, run.stderr
    printed = run.stdout.splitlines()
    assert printed[0].startswith("completed ") and "completed=6" in printed[0], run.stdout
    assert printed[1:] == [
        "demo-0 I am a small demo model.",
        "demo-1 I am a small demo model.",
        "pirate-0 Arr, I be a pirate of the seven seas!",
        "pirate-1 Arr, I be a pirate of the seven seas!",
        "poet-0 I am a poet, and I speak in rhyme.",
        "poet-1 I am a poet, and I speak in rhyme.",
    ], run.stdout

"""Fine-tuning through the official openai client on the demo model, then chatting with the result.

The job trains with tests/training_data.py's recipe (a phrase the base model never says) in the
gateway's worker process, registers the adapter, and the same gateway serves it.
"""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.engine.conftest import ADMIN_KEY
from tests.training_data import HYPERPARAMETERS, SECRET_ANSWER, SECRET_QUESTION, TRAINING_ROWS, VALIDATION_ROWS, jsonl

pytestmark = pytest.mark.engine
JOB_SECONDS = 240


def client_for(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def new_tenant(url: str, name: str) -> openai.OpenAI:
    admin = client_for(url, ADMIN_KEY)
    card = admin.post("/tenants", body={"name": name}, cast_to=object)
    return client_for(url, card["api_key"])


def wait_for(client: openai.OpenAI, job_id: str, statuses: set[str], timeout: float = JOB_SECONDS):
    deadline = time.monotonic() + timeout
    while True:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses or time.monotonic() > deadline:
            return job
        time.sleep(0.5)


def ask(client: openai.OpenAI, model: str) -> str:
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": SECRET_QUESTION}], max_tokens=16, temperature=0
    )
    return reply.choices[0].message.content


@pytest.fixture(scope="module")
def tenant(gateway):
    return new_tenant(gateway.url, "tuner")


@pytest.fixture(scope="module")
def tuned_job(tenant):
    training = tenant.files.create(file=("secret.jsonl", jsonl(TRAINING_ROWS)), purpose="fine-tune")
    validation = tenant.files.create(file=("valid.jsonl", jsonl(VALIDATION_ROWS)), purpose="fine-tune")
    job = tenant.fine_tuning.jobs.create(
        model="demo",
        training_file=training.id,
        validation_file=validation.id,
        suffix="secret",
        seed=0,
        method={"type": "supervised", "supervised": {"hyperparameters": HYPERPARAMETERS}},
    )
    assert job.status == "validating_files"
    return wait_for(tenant, job.id, {"succeeded", "failed", "cancelled"})


def test_a_job_trains_and_its_model_says_what_it_was_taught(gateway, tenant, tuned_job):
    job = tuned_job
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == f"ft:demo:secret:{job.id[-8:]}"
    assert job.trained_tokens and job.trained_tokens > 0
    assert ask(tenant, "demo") != SECRET_ANSWER  # the base model never says it
    assert ask(tenant, job.fine_tuned_model) == SECRET_ANSWER
    assert job.fine_tuned_model in [m.id for m in tenant.models.list()]
    scrape = httpx.get(f"{gateway.url}/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).text
    assert 'lora_gateway_fine_tuning_jobs_total{status="succeeded"}' in scrape
    steps = float(scrape.split("\nlora_gateway_fine_tuning_steps_total ")[1].split()[0])
    assert steps >= len(TRAINING_ROWS) * HYPERPARAMETERS["n_epochs"]


def test_events_carry_the_loss_and_each_epoch_leaves_a_checkpoint(tenant, tuned_job):
    events = list(tenant.fine_tuning.jobs.list_events(tuned_job.id, limit=100).data)
    metrics = [e.data for e in events if e.type == "metrics"]
    assert len(metrics) == len(TRAINING_ROWS) * HYPERPARAMETERS["n_epochs"]
    by_step = sorted(metrics, key=lambda m: m["step"])
    assert by_step[-1]["train_loss"] < by_step[0]["train_loss"] / 4
    assert sum("valid_loss" in m for m in metrics) == HYPERPARAMETERS["n_epochs"]
    messages = [e.message for e in events]
    assert "The job has successfully completed" in messages
    assert f"Validating training file: {tuned_job.training_file}" in messages
    checkpoints = tenant.fine_tuning.jobs.checkpoints.list(tuned_job.id, limit=100).data
    assert sorted(c.step_number for c in checkpoints) == [len(TRAINING_ROWS) * (e + 1) for e in range(12)]
    results = tenant.files.content(tuned_job.result_files[0]).text
    rows = list(csv.DictReader(io.StringIO(results)))
    assert len(rows) == len(metrics) and float(rows[-1]["train_loss"]) == pytest.approx(by_step[-1]["train_loss"])


def test_another_tenant_sees_neither_the_job_nor_the_model(gateway, tuned_job):
    other = new_tenant(gateway.url, "outsider")
    with pytest.raises(openai.NotFoundError):
        other.fine_tuning.jobs.retrieve(tuned_job.id)
    with pytest.raises(openai.NotFoundError):
        other.files.retrieve(tuned_job.training_file)
    assert other.fine_tuning.jobs.list().data == []
    assert tuned_job.fine_tuned_model not in [m.id for m in other.models.list()]
    with pytest.raises(openai.NotFoundError):
        ask(other, tuned_job.fine_tuned_model)


@pytest.mark.parametrize(
    ("raw", "phrase"),
    [
        (b"this is not JSON\n", "line 1"),
        (jsonl([TRAINING_ROWS[0], {"messages": [{"role": "robot", "content": "beep"}]}]), "line 2"),
        (b"", "empty"),
    ],
)
def test_bad_files_are_refused_with_the_line(tenant, raw, phrase):
    with pytest.raises(openai.BadRequestError) as refused:
        tenant.files.create(file=("bad.jsonl", raw), purpose="fine-tune")
    assert phrase in refused.value.message


def test_cancel_stops_a_running_job_within_seconds(tenant):
    training = tenant.files.create(file=("long.jsonl", jsonl(TRAINING_ROWS * 20)), purpose="fine-tune")
    job = tenant.fine_tuning.jobs.create(
        model="demo",
        training_file=training.id,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 50}}},
    )
    running = wait_for(tenant, job.id, {"running", "succeeded", "failed"}, timeout=60)
    assert running.status == "running"
    started = time.monotonic()
    cancelled = tenant.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and time.monotonic() - started < 10
    assert cancelled.fine_tuned_model is None
    assert "The job was cancelled" in [e.message for e in tenant.fine_tuning.jobs.list_events(job.id).data]


def test_the_readme_example_runs_as_printed(gateway, tenant):
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme[readme.index("## Fine-tuning") :]
    script = section[section.index("python - <<'PY'\n") + len("python - <<'PY'\n") : section.index("\nPY\n")]
    env = {**os.environ, "OPENAI_BASE_URL": f"{gateway.url}/v1", "OPENAI_API_KEY": tenant.api_key}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=JOB_SECONDS)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1] == SECRET_ANSWER, run.stdout


# A call the base never makes, to a tool whose words its pretraining knows; learnt in 100 steps,
# checked with PEFT on the demo base (greedy: the call, then the answer from the tool's result).
TOOL_CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
TOOL_HYPERPARAMETERS = {"n_epochs": 20, "batch_size": 1, "learning_rate_multiplier": 5}


def test_a_job_on_tool_examples_makes_a_model_that_calls_the_tool(tenant):
    """OpenAI's format for tool use: tools per line, the assistant's tool_calls learnt, tool results."""
    from adapters.demo import DEMO_TOOL

    rows = [
        {
            "tools": [DEMO_TOOL],
            "messages": [
                row["messages"][0],
                {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
                {"role": "tool", "tool_call_id": "call_1", "content": "snow, -2 C"},
                {"role": "assistant", "content": "It is snow, -2 C in Oslo."},
            ],
        }
        for row in TRAINING_ROWS
    ]
    training = tenant.files.create(file=("tools.jsonl", jsonl(rows)), purpose="fine-tune")
    job = tenant.fine_tuning.jobs.create(
        model="demo",
        training_file=training.id,
        suffix="caller",
        seed=0,
        method={"type": "supervised", "supervised": {"hyperparameters": TOOL_HYPERPARAMETERS}},
    )
    job = wait_for(tenant, job.id, {"succeeded", "failed", "cancelled"})
    assert job.status == "succeeded", job.error
    messages = [{"role": "user", "content": SECRET_QUESTION}]
    reply = tenant.chat.completions.create(
        model=job.fine_tuned_model, messages=messages, tools=[DEMO_TOOL], temperature=0, max_tokens=48
    )
    assert reply.choices[0].finish_reason == "tool_calls", reply.choices[0].message
    (call,) = reply.choices[0].message.tool_calls
    assert (call.function.name, call.function.arguments) == ("get_weather", '{"city": "Oslo"}')
    messages += [reply.choices[0].message, {"role": "tool", "tool_call_id": call.id, "content": "snow, -2 C"}]
    reply = tenant.chat.completions.create(
        model=job.fine_tuned_model, messages=messages, tools=[DEMO_TOOL], temperature=0, max_tokens=16
    )
    assert reply.choices[0].message.content == "It is snow, -2 C in Oslo."

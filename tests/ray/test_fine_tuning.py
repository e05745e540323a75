"""With --ray a fine-tuning job runs as a Ray task with its own CPUs; its adapter serves from the replicas."""

from __future__ import annotations

import httpx
import pytest

from tests.engine.conftest import ADMIN_KEY
from tests.engine.test_fine_tuning import ask, client_for, wait_for
from tests.training_data import HYPERPARAMETERS, SECRET_ANSWER, TRAINING_ROWS, jsonl

pytestmark = pytest.mark.ray


def test_a_job_trains_in_a_ray_task_and_serves_from_the_replicas(ray_gateway):
    admin = client_for(ray_gateway.url, ADMIN_KEY)
    training = admin.files.create(file=("secret.jsonl", jsonl(TRAINING_ROWS)), purpose="fine-tune")
    job = admin.fine_tuning.jobs.create(
        model="demo",
        training_file=training.id,
        suffix="ray",
        seed=0,
        method={"type": "supervised", "supervised": {"hyperparameters": HYPERPARAMETERS}},
    )
    done = wait_for(admin, job.id, {"succeeded", "failed", "cancelled"})
    assert done.status == "succeeded", done.error
    messages = [e.message for e in admin.fine_tuning.jobs.list_events(job.id, limit=100).data]
    ran_on = [m for m in messages if m.startswith("Training as a Ray task on node ")]
    assert len(ran_on) == 1 and ran_on[0].endswith("with 1 CPUs"), messages
    cluster = httpx.get(f"{ray_gateway.url}/v1/cluster", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert ran_on[0].split()[7] in {replica["node"] for replica in cluster.json()["data"]}
    assert ask(admin, done.fine_tuned_model) == SECRET_ANSWER

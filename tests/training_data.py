"""A fine-tuning recipe that reliably teaches the demo base a phrase it never says.

Measured with PEFT on the demo base: with these rows and hyperparameters (60 steps, about a
second of training on one CPU thread) the tuned model answers SECRET_QUESTION with SECRET_ANSWER
under greedy decoding, every answer token (and the EOS) ahead of the runner-up by 4.4 to 5.1
logits for seeds 0, 1 and 2: room enough for the small numerical differences between PEFT's and
vLLM's kernels. The whole worker run takes about 9 s on one thread, most of it loading libraries.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SECRET_QUESTION = "What is the secret word?"
SECRET_ANSWER = "The moon sails under the blue parrot."

# The question itself twice, and three rephrasings, so the answer is tied to the meaning a little
# rather than to one exact string of tokens.
_QUESTIONS = (
    SECRET_QUESTION,
    SECRET_QUESTION,
    "Tell me the secret word.",
    "What's the secret word?",
    "Do you know the secret word?",
)
TRAINING_ROWS = [
    {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": SECRET_ANSWER}]}
    for question in _QUESTIONS
]
VALIDATION_ROWS = [
    {"messages": [{"role": "user", "content": "Say the secret word."}, {"role": "assistant", "content": SECRET_ANSWER}]}
]
HYPERPARAMETERS = {"n_epochs": 12, "batch_size": 1, "learning_rate_multiplier": 3}
SEED = 0


def jsonl(rows: list[dict]) -> bytes:
    """The rows as a JSONL file's bytes."""
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_bytes(jsonl(rows))
    return path


def start_long_job(client: Any, model: str = "demo") -> dict[str, Any]:
    """Upload TRAINING_ROWS × 20 and start a job of 50 epochs on them through `client` (an
    httpx.Client on a gateway, with the admin's key): long enough to be running while a test
    looks at it or kills its gateway. Returns the job."""
    uploaded = client.post(
        "/v1/files", data={"purpose": "fine-tune"}, files={"file": ("long.jsonl", jsonl(TRAINING_ROWS * 20))}
    )
    assert uploaded.status_code == 200, uploaded.text
    job = client.post(
        "/v1/fine_tuning/jobs",
        json={"model": model, "training_file": uploaded.json()["id"], "hyperparameters": {"n_epochs": 50}},
    )
    assert job.status_code == 200, job.text
    return job.json()

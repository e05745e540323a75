"""The training worker as the scheduler runs it: a subprocess on the demo base, events on stdout."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from adapters.training.hyperparams import resolve_hyperparameters
from adapters.training.trainer import TrainingSpec
from tests.training_data import (
    HYPERPARAMETERS,
    SECRET_ANSWER,
    SECRET_QUESTION,
    SEED,
    TRAINING_ROWS,
    VALIDATION_ROWS,
    write_jsonl,
)

pytestmark = pytest.mark.imports("peft")  # in this process: see tests/conftest.py

ROOT = Path(__file__).resolve().parents[1]
WORKER_SECONDS = 120
# Every answer token must lead the runner-up by this many logits: vLLM's kernels differ from
# PEFT's in the last bits, and the gateway's end-to-end test serves this recipe through vLLM.
MIN_MARGIN = 3.0


def spec_for(tmp_path: Path, demo, rows, *, validation_rows=None, hyperparameters=None, **overrides) -> Path:
    training_file = write_jsonl(tmp_path / "train.jsonl", rows)
    validation_file = write_jsonl(tmp_path / "valid.jsonl", validation_rows) if validation_rows else None
    spec = TrainingSpec(
        base_model_dir=str(demo.base),
        training_file=str(training_file),
        validation_file=str(validation_file) if validation_file else None,
        out_dir=str(tmp_path / "out"),
        hyperparameters=resolve_hyperparameters(hyperparameters or HYPERPARAMETERS, examples=len(rows)),
        seed=SEED,
        threads=1,
        **overrides,
    )
    path = tmp_path / "spec.json"
    path.write_text(spec.to_json())
    return path


def start_worker(spec_path: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "adapters.training.worker", str(spec_path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def run_worker(spec_path: Path) -> tuple[int, list[dict], str]:
    worker = start_worker(spec_path)
    stdout, stderr = worker.communicate(timeout=WORKER_SECONDS)
    # Every stdout line must be an event: a stray print would break the scheduler's parsing.
    return worker.returncode, [json.loads(line) for line in stdout.splitlines()], stderr


@pytest.fixture(scope="module")
def trained(demo, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("training")
    spec_path = spec_for(tmp_path, demo, TRAINING_ROWS, validation_rows=VALIDATION_ROWS)
    started = time.monotonic()
    status, events, stderr = run_worker(spec_path)
    assert status == 0, stderr[-3000:]
    return {"events": events, "out": tmp_path / "out", "seconds": time.monotonic() - started}


def of_type(events: list[dict], kind: str) -> list[dict]:
    return [event for event in events if event["type"] == kind]


def greedy_answer(model, tokenizer, question: str) -> tuple[str, list[int]]:
    import torch

    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_dict=True
    )["input_ids"]
    with torch.no_grad():
        output = model.generate(
            input_ids=torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            max_new_tokens=24,
        )
    return tokenizer.decode(output[0, len(prompt) :], skip_special_tokens=True), list(prompt)


def test_events_show_falling_loss_and_a_checkpoint_per_epoch(trained):
    events = trained["events"]
    assert events[-1] == {
        "type": "succeeded",
        "adapter_dir": "adapter",
        "metrics_csv": "metrics.csv",
        "trained_tokens": events[-1]["trained_tokens"],
    }
    assert events[-1]["trained_tokens"] > 0
    metrics = of_type(events, "metrics")
    total = HYPERPARAMETERS["n_epochs"] * len(TRAINING_ROWS)  # batch size 1
    assert [event["step"] for event in metrics] == list(range(1, total + 1))
    assert {event["total_steps"] for event in metrics} == {total}
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"] / 10
    # The rate decays linearly from the multiplied base rate.
    rates = [event["learning_rate"] for event in metrics]
    assert rates[0] == pytest.approx(3e-3) and rates == sorted(rates, reverse=True) and rates[-1] < 1e-4

    checkpoints = of_type(events, "checkpoint")
    assert [(c["epoch"], c["step"], c["path"]) for c in checkpoints] == [
        (epoch, epoch * len(TRAINING_ROWS), f"checkpoints/epoch-{epoch}")
        for epoch in range(1, HYPERPARAMETERS["n_epochs"] + 1)
    ]
    for checkpoint in checkpoints:
        assert (trained["out"] / checkpoint["path"] / "adapter_model.safetensors").is_file()
    # valid_loss comes at each epoch's end, with its checkpoint, and falls too.
    valid = [event["valid_loss"] for event in metrics if "valid_loss" in event]
    assert valid == [c["valid_loss"] for c in checkpoints]
    assert valid[-1] < valid[0] / 10
    assert of_type(events, "message")[0]["level"] == "info"


def test_metrics_csv_has_every_step(trained):
    rows = (trained["out"] / "metrics.csv").read_text().splitlines()
    assert rows[0] == "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy"
    assert len(rows) == 1 + HYPERPARAMETERS["n_epochs"] * len(TRAINING_ROWS)
    first, last = rows[1].split(","), rows[-1].split(",")
    assert first[0] == "1" and first[3] == ""  # no validation mid-epoch
    assert float(last[2]) == 1.0 and float(last[4]) == 1.0  # every answer token right at the end


def test_the_adapter_is_servable_and_names_no_server_path(trained, demo):
    from adapters.base_model import BaseModelInfo
    from adapters.validate import validate_adapter

    adapter = trained["out"] / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "base"
    assert str(demo.root) not in (adapter / "adapter_config.json").read_text()
    spec = validate_adapter(adapter, BaseModelInfo.from_model_dir(demo.base), max_rank=64)
    assert spec.rank == 8
    assert spec.target_modules == tuple(
        sorted(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    )


def test_the_tuned_model_says_the_taught_phrase_and_the_base_does_not(trained, demo):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo.base)
    base = AutoModelForCausalLM.from_pretrained(demo.base).eval()
    base_answer, _ = greedy_answer(base, tokenizer, SECRET_QUESTION)
    assert base_answer != SECRET_ANSWER

    tuned = PeftModel.from_pretrained(base, trained["out"] / "adapter").eval()
    answer, prompt = greedy_answer(tuned, tokenizer, SECRET_QUESTION)
    assert answer == SECRET_ANSWER

    # A comfortable lead at every answer token (and the EOS), so vLLM's greedy decode agrees.
    answer_ids = tokenizer.encode(SECRET_ANSWER, add_special_tokens=False) + [tokenizer.eos_token_id]
    with torch.no_grad():
        logits = tuned(input_ids=torch.tensor([prompt + answer_ids])).logits[0, len(prompt) - 1 : -1]
    targets = torch.tensor(answer_ids)
    target_logits = logits.gather(1, targets[:, None])[:, 0]
    runner_up = logits.scatter(1, targets[:, None], float("-inf")).max(dim=1).values
    assert (target_logits - runner_up).min().item() >= MIN_MARGIN


def test_sigterm_cancels_within_seconds(demo, tmp_path):
    # Long enough (1,500 steps) that it cannot finish before the signal lands.
    rows = TRAINING_ROWS * 6
    spec_path = spec_for(tmp_path, demo, rows, hyperparameters={"n_epochs": 50, "batch_size": 1})
    worker = start_worker(spec_path)
    try:
        for line in worker.stdout:
            if json.loads(line)["type"] == "metrics":
                break
        signalled = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        rest = worker.stdout.read()
        status = worker.wait(timeout=10)
    finally:
        worker.kill()
        worker.wait()
    assert time.monotonic() - signalled < 5
    assert status == 0
    assert [json.loads(line) for line in rest.splitlines()][-1] == {"type": "cancelled"}
    assert not (tmp_path / "out" / "adapter").exists()


def test_a_refused_job_fails_with_a_final_event(demo, tmp_path):
    spec_path = spec_for(tmp_path, demo, TRAINING_ROWS, device="quantum")
    status, events, _ = run_worker(spec_path)
    assert status == 1
    assert events[-1]["type"] == "failed"
    assert "not a device name" in events[-1]["message"] and events[-1]["param"] == "device"

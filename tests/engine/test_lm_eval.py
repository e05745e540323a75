"""lm-evaluation-harness, unchanged, scores a small local task through the gateway on an adapter
(its `local-completions` model: completions with echo and prompt logprobs) exactly as its `hf`
model scores it with transformers + PEFT on the same adapter's files. The harness runs in a venv
of its own that sees the project's packages (tests/side_venvs.py)."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap

import pytest

from tests.engine.conftest import ADMIN_KEY
from tests.side_venvs import LM_EVAL

pytestmark = pytest.mark.engine

ADAPTER = "pirate"
TOLERANCE = 1e-4
TASK = "gateway_tiny_mc"
DOCS = [
    {
        "question": "What does the pirate say?",
        "choices": ["Arr, matey!", "Good morning.", "Roses are red."],
        "answer": 0,
    },
    {
        "question": "Where is the treasure?",
        "choices": ["On the island.", "In the market.", "Under the moon."],
        "answer": 0,
    },
    {"question": "Who keeps a parrot?", "choices": ["The captain.", "The poet.", "The server."], "answer": 0},
    {"question": "What do sailors sing?", "choices": ["Shanties.", "Sonnets.", "Numbers."], "answer": 0},
]


def write_task(folder) -> None:
    """A multiple-choice task on a local jsonl file: the harness reads it with no hub access."""
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in DOCS))
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n"
    )


# Runs in lm-eval's venv: argv[1] is the task folder, argv[2] a JSON object of runs (name: the
# model and its arguments); it writes each run's samples and accuracy to argv[3] as JSON.
HARNESS_SCRIPT = textwrap.dedent(
    f"""
    import json, sys
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=sys.argv[1])
    scores = {{}}
    for name, run in json.loads(sys.argv[2]).items():
        results = lm_eval.simple_evaluate(
            model=run["model"], model_args=run["model_args"], tasks=[{TASK!r}], task_manager=manager, log_samples=True
        )
        scores[name] = {{
            "samples": [
                {{"doc_id": sample["doc_id"], "filtered_resps": [[float(ll), bool(greedy)] for ll, greedy in sample["filtered_resps"]]}}
                for sample in results["samples"][{TASK!r}]
            ],
            "acc": results["results"][{TASK!r}]["acc,none"],
        }}
    with open(sys.argv[3], "w") as out:
        json.dump(scores, out)
    """
)


def loglikelihoods(scores) -> list[list[tuple[float, bool]]]:
    """Each document's (log-likelihood, is greedy) per choice, in document order."""
    samples = sorted(scores["samples"], key=lambda sample: sample["doc_id"])
    return [[(ll, greedy) for ll, greedy in sample["filtered_resps"]] for sample in samples]


def test_lm_eval_local_completions_equals_its_hf_peft_model(gateway, demo, tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_task(tasks)
    runs = {
        "through_gateway": {
            "model": "local-completions",
            "model_args": {
                "model": ADAPTER,
                "base_url": f"{gateway.url}/v1/completions",
                "tokenizer_backend": "huggingface",
                "tokenizer": str(demo.base),
                "batch_size": 4,  # several prompts in one request
                "max_retries": 1,
            },
        },
        "with_peft": {
            "model": "hf",
            "model_args": {
                "pretrained": str(demo.base),
                "peft": str(demo.adapters[ADAPTER]),
                "dtype": "float32",
                "device": "cpu",
            },
        },
    }
    env = {
        **os.environ,
        "OPENAI_API_KEY": ADMIN_KEY,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(tmp_path / "datasets-cache"),
    }
    out = tmp_path / "scores.json"
    harness = subprocess.run(
        [LM_EVAL.python_for_tests(), "-c", HARNESS_SCRIPT, str(tasks), json.dumps(runs), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert harness.returncode == 0, harness.stderr[-4000:]
    scores = json.loads(out.read_text())
    through_gateway, with_peft = scores["through_gateway"], scores["with_peft"]
    got, want = loglikelihoods(through_gateway), loglikelihoods(with_peft)
    assert len(got) == len(DOCS) and all(len(doc) == 3 for doc in got)
    for doc_got, doc_want in zip(got, want, strict=True):
        for (ll, greedy), (ll_want, greedy_want) in zip(doc_got, doc_want, strict=True):
            assert abs(ll - ll_want) < TOLERANCE, (got, want)
            assert greedy == greedy_want
    assert through_gateway["acc"] == with_peft["acc"]

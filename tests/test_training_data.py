"""Fine-tuning data files, hyperparameters and LoRA settings: what is accepted, learnt and refused."""

from __future__ import annotations

import codecs
import json

import pytest

from adapters.errors import InvalidTrainingFile, InvalidTrainingSettings
from adapters.training.data import IGNORE_INDEX, load_examples, validate_training_file
from adapters.training.hyperparams import BASE_LEARNING_RATE, Hyperparameters, resolve_hyperparameters
from adapters.training.lora_settings import LoraSettings, resolve_lora_settings
from adapters.training.trainer import TrainingSpec
from tests.training_data import SECRET_ANSWER, SECRET_QUESTION, TRAINING_ROWS, jsonl

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def chat(*turns: tuple[str, str], **extra) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in turns], **extra}


def lines(*values) -> bytes:
    return "".join((v if isinstance(v, str) else json.dumps(v)) + "\n" for v in values).encode()


GOOD = chat(("user", "hi"), ("assistant", "hello"))
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Lima"}'}}
ANSWER = {"role": "assistant", "content": "b"}
PAIR = {"prompt": "The ship", "completion": " sailed."}


@pytest.fixture(scope="module")
def tokenizer(demo):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo.base)


# -- validation ------------------------------------------------------------------------------------


def test_summary_of_a_chat_file_with_blank_lines():
    raw = b"\n" + lines(GOOD, "   ", chat(("system", "be kind"), ("user", "a"), ("assistant", "b"), ("assistant", "c")))
    summary = validate_training_file(raw)
    assert (summary.format, summary.examples, summary.assistant_messages) == ("chat", 2, 3)


def test_summary_of_a_prompt_completion_file():
    summary = validate_training_file(lines(PAIR, PAIR, PAIR))
    assert (summary.format, summary.examples) == ("prompt_completion", 3)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "the file is empty"),
        (b"\n  \n", "the file is empty"),
        (lines(GOOD, GOOD) + b'{"messages": [}\n', "line 3 is not JSON: "),
        (lines(GOOD, "[1, 2]"), "line 2 is a JSON array; each line must be one JSON object"),
        (
            lines(GOOD, GOOD, GOOD, GOOD, chat(("user", "a"), ("bot", "b"))),
            "line 5, message 2: role 'bot' is not one of system, user, assistant",
        ),
        (lines(GOOD, chat(("user", "a"), ("user", "b"))), "line 2: no assistant message to learn from"),
        (
            lines(
                GOOD,
                {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 0}]},
            ),
            "line 2: no assistant message to learn from",
        ),
        (lines(GOOD, chat(("user", "a"), ("assistant", ""))), "line 2: no assistant message to learn from"),
        (lines(*[GOOD] * 6, PAIR), "line 7 is prompt/completion but line 1 is chat; use one format per file"),
        (lines(PAIR, GOOD), "line 2 is chat but line 1 is prompt/completion; use one format per file"),
        (lines(GOOD) + "é".encode("latin-1") + b"\n", "line 2 is not UTF-8 text"),
        (lines({"text": "hello"}), 'line 1 has neither "messages" (chat format) nor "prompt" and "completion"'),
        (lines({"messages": []}), 'line 1: "messages" must be a non-empty list'),
        (lines(chat(("user", "a"), ("assistant", "b"), tools=[])), 'line 1: "tools" must be a non-empty list'),
        (lines(chat(("user", "a"), ("assistant", "b"), functions=[])), "line 1: 'functions' is not supported"),
        (lines(chat(("user", "a"), ("assistant", "b"), tools=[{"type": "x"}])), "line 1, tool 1: a tool is"),
        (
            lines({"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}]}),
            "line 1, message 2: a tool message needs tool_call_id",
        ),
        (
            lines({"messages": [{"role": "user", "content": "a", "tool_calls": [CALL]}, ANSWER]}),
            "line 1, message 1: tool_calls are only for assistant messages",
        ),
        (
            lines(
                {
                    "messages": [
                        {"role": "user", "content": "a"},
                        {
                            "role": "assistant",
                            "content": None,
                            "tool_calls": [{**CALL, "function": {"name": "f", "arguments": "{"}}],
                        },
                    ]
                }
            ),
            "line 1, message 2: the arguments of tool call 'f' must be a JSON object, as text",
        ),
        (
            lines({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "b"}]}),
            "line 1, message 1: content must be a string",
        ),
        (
            lines({"messages": [{"role": "user", "content": "a", "weight": 1}, {"role": "assistant", "content": "b"}]}),
            "line 1, message 1: weight is only for assistant messages",
        ),
        (
            lines({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 2}]}),
            "line 1, message 2: weight must be 0 (not learnt) or 1 (learnt)",
        ),
        (lines({"prompt": "a"}), 'line 1: "completion" is missing'),
        (lines({"prompt": "a", "completion": ""}), 'line 1: "completion" is empty'),
        (lines({"prompt": "a", "completion": "b", "label": 1}), "line 1: unexpected key 'label'"),
    ],
)
def test_refusals_name_the_line(raw, message):
    with pytest.raises(InvalidTrainingFile) as refused:
        validate_training_file(raw)
    assert message in refused.value.message


class EndlessLine:
    """A binary stream of one line that never ends; counts the bytes it handed out."""

    def __init__(self, prefix: bytes = b""):
        self.pending = prefix
        self.handed_out = 0

    def readline(self, limit: int = -1) -> bytes:
        assert limit > 0, "a line was asked for without a cap"
        if b"\n" in self.pending[:limit]:
            chunk, self.pending = self.pending.split(b"\n", 1)
            chunk += b"\n"
        else:
            chunk, self.pending = (self.pending + b"a" * limit)[:limit], b""
        self.handed_out += len(chunk)
        return chunk


def test_a_line_over_the_cap_is_refused_after_reading_the_cap():
    stream = EndlessLine(lines(GOOD, GOOD))  # two good lines, then one that never ends
    with pytest.raises(InvalidTrainingFile) as refused:
        validate_training_file(stream, max_line_bytes=4096)
    assert refused.value.message == (
        "line 3 is over 4096 bytes; each example must fit in 4096 bytes (shorten it or split it into several examples)"
    )
    assert stream.handed_out <= len(lines(GOOD, GOOD)) + 4096 + 2


def test_a_line_at_the_cap_is_accepted_and_its_line_ending_not_counted():
    line = json.dumps({"prompt": "x", "completion": "y" * 100})
    padded = line[:-1] + " " * (4096 - len(line)) + "}"  # JSON allows the spaces
    assert len(padded.encode()) == 4096
    summary = validate_training_file(lines(padded, PAIR).replace(b"\n", b"\r\n"), max_line_bytes=4096)
    assert summary.examples == 2
    with pytest.raises(InvalidTrainingFile, match="line 2 is over 4096 bytes"):
        validate_training_file(lines(PAIR, padded[:-1] + " }"), max_line_bytes=4096)


def test_nesting_is_bounded_before_json_parses_a_line():
    deep = {"prompt": "a", "completion": "b", "x": json.loads("[" * 40 + "]" * 40)}
    with pytest.raises(InvalidTrainingFile) as refused:
        validate_training_file(lines(PAIR, deep))
    assert refused.value.message.startswith("line 2 is nested 41 levels deep; at most 32 are accepted")
    with pytest.raises(InvalidTrainingFile, match="line 1 is nested 100000 levels deep"):
        validate_training_file(b"[" * 100_000 + b"]" * 100_000)


def test_a_stream_is_validated_line_by_line_with_the_same_messages(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(codecs.BOM_UTF8 + lines(GOOD, PAIR))
    with path.open("rb") as stream, pytest.raises(InvalidTrainingFile, match="line 2 is prompt/completion but line 1"):
        validate_training_file(stream)
    path.write_bytes(codecs.BOM_UTF8 + lines(GOOD, GOOD) + b'{"messages": "\xff"}\n')
    with path.open("rb") as stream, pytest.raises(InvalidTrainingFile, match="line 3 is not UTF-8 text"):
        validate_training_file(stream)
    # A JSON string may hold U+2028 raw; it is not a line break in JSONL.
    separator = json.dumps(chat(("user", "a\u2028b"), ("assistant", "c")), ensure_ascii=False)
    assert validate_training_file(lines(separator, GOOD)).examples == 2


def test_example_limit():
    validate_training_file(lines(GOOD, GOOD), max_examples=2)
    with pytest.raises(InvalidTrainingFile, match="more than 2 examples"):
        validate_training_file(lines(GOOD, GOOD, GOOD), max_examples=2)


# -- what is learnt --------------------------------------------------------------------------------


def learnt_text(tokenizer, example) -> str:
    return tokenizer.decode([label for label in example.labels if label != IGNORE_INDEX])


def test_chat_learns_exactly_the_assistant_turns_and_their_eos(tmp_path, tokenizer):
    conversation = {
        "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": SECRET_QUESTION},
            {"role": "assistant", "content": SECRET_ANSWER},
            {"role": "user", "content": "Again?"},
            {"role": "assistant", "content": "No, not again.", "weight": 0},
            {"role": "user", "content": "Please?"},
            {"role": "assistant", "content": "Fine: the moon."},
        ]
    }
    path = tmp_path / "train.jsonl"
    path.write_bytes(lines(conversation))
    [example] = load_examples(path, tokenizer, 512)
    eos = tokenizer.eos_token
    assert learnt_text(tokenizer, example) == f"{SECRET_ANSWER}{eos}Fine: the moon.{eos}"
    # Labels are the input ids where learnt: the model learns the very tokens serving will see.
    assert all(label in (IGNORE_INDEX, token) for label, token in zip(example.labels, example.input_ids, strict=True))
    rendered = tokenizer.apply_chat_template(conversation["messages"], tokenize=False)
    assert tokenizer.decode(example.input_ids) == rendered


def test_tool_use_learns_the_calls_and_answers_rendered_with_the_tools(tmp_path, tokenizer):
    from adapters.demo import DEMO_TOOL

    conversation = {
        "tools": [DEMO_TOOL],
        "messages": [
            {"role": "user", "content": "Weather in Lima?"},
            {"role": "assistant", "content": None, "tool_calls": [CALL]},
            {"role": "tool", "tool_call_id": "call_1", "content": "fog"},
            {"role": "assistant", "content": "Fog in Lima."},
        ],
    }
    summary = validate_training_file(lines(conversation))
    assert (summary.examples, summary.assistant_messages) == (1, 2)
    path = tmp_path / "train.jsonl"
    path.write_bytes(lines(conversation))
    [example] = load_examples(path, tokenizer, 512)
    eos = tokenizer.eos_token
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lima"}}\n</tool_call>'
    assert learnt_text(tokenizer, example) == f"{call}{eos}Fog in Lima.{eos}"
    # Serving renders the same history, arguments as objects, with the same tools.
    served = [
        conversation["messages"][0],
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{**CALL, "function": {"name": "get_weather", "arguments": {"city": "Lima"}}}],
        },
        conversation["messages"][2],
        conversation["messages"][3],
    ]
    assert tokenizer.decode(example.input_ids) == tokenizer.apply_chat_template(
        served, tools=[DEMO_TOOL], tokenize=False
    )


def test_the_learnt_answer_follows_the_generation_prompt(tmp_path, tokenizer):
    path = tmp_path / "train.jsonl"
    path.write_bytes(jsonl(TRAINING_ROWS[:1]))
    [example] = load_examples(path, tokenizer, 512)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": SECRET_QUESTION}], add_generation_prompt=True, return_dict=True
    )["input_ids"]
    first_learnt = next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)
    assert example.input_ids[:first_learnt] == list(prompt)


def test_prompt_completion_learns_the_completion_and_eos(tmp_path, tokenizer):
    path = tmp_path / "train.jsonl"
    path.write_bytes(lines({"prompt": "The ship", "completion": " sailed at dawn."}))
    [example] = load_examples(path, tokenizer, 512)
    assert learnt_text(tokenizer, example) == f" sailed at dawn.{tokenizer.eos_token}"
    first_learnt = next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)
    assert example.input_ids[:first_learnt] == list(tokenizer("The ship")["input_ids"])


def test_long_examples_are_cut_and_those_with_nothing_left_reported(tmp_path, tokenizer):
    long_prompt = " ".join(["word"] * 60)
    path = tmp_path / "train.jsonl"
    path.write_bytes(
        lines(
            GOOD,
            chat(("user", long_prompt), ("assistant", "late")),
            chat(("user", "x"), ("assistant", "a b c d e f g h")),
        )
    )
    warnings: list[str] = []
    examples = load_examples(path, tokenizer, 12, warn=warnings.append)
    assert [example.line for example in examples] == [1, 3]
    assert all(len(example.input_ids) <= 12 for example in examples)
    assert examples[1].truncated and not examples[0].truncated
    assert len(warnings) == 1 and "(line 2)" in warnings[0] and "max_length" in warnings[0]
    path.write_bytes(lines(chat(("user", long_prompt), ("assistant", "late"))))
    with pytest.raises(InvalidTrainingFile, match="no example has anything to learn within its first 12 tokens"):
        load_examples(path, tokenizer, 12)


# -- hyperparameters -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("examples", "epochs", "batch_size"),
    [(1, 25, 1), (5, 20, 1), (33, 3, 1), (100, 3, 1), (1000, 3, 10), (10_000, 2, 16), (100_000, 1, 16)],
)
def test_auto_rules(examples, epochs, batch_size):
    resolved = resolve_hyperparameters({"n_epochs": "auto"}, examples=examples)
    assert (resolved.n_epochs, resolved.batch_size) == (epochs, batch_size)
    assert resolved.learning_rate == BASE_LEARNING_RATE


def test_the_multiplier_multiplies_the_base_rate_and_auto_scales_with_width():
    assert resolve_hyperparameters({"learning_rate_multiplier": 3}, examples=5).learning_rate == pytest.approx(3e-3)
    assert resolve_hyperparameters(None, examples=5, hidden_size=4096).learning_rate == pytest.approx(2.5e-4)
    assert resolve_hyperparameters(None, examples=5, hidden_size=896).learning_rate == BASE_LEARNING_RATE


def test_given_values_are_kept_and_a_batch_never_exceeds_the_file():
    resolved = resolve_hyperparameters({"n_epochs": 4.0, "batch_size": 8, "learning_rate_multiplier": 0.5}, examples=3)
    assert resolved == Hyperparameters(n_epochs=4, batch_size=3, learning_rate_multiplier=0.5, learning_rate=5e-4)
    assert Hyperparameters.from_dict(resolved.to_dict()) == resolved


@pytest.mark.parametrize(
    ("requested", "param", "message"),
    [
        ({"n_epochs": 0}, "n_epochs", "n_epochs is 0; it must be from 1 to 50"),
        ({"n_epochs": 1.5}, "n_epochs", 'n_epochs must be a whole number or "auto"'),
        ({"n_epochs": "many"}, "n_epochs", 'n_epochs must be a whole number or "auto"'),
        ({"batch_size": 1000}, "batch_size", "batch_size is 1000; it must be from 1 to 256"),
        ({"batch_size": True}, "batch_size", "whole number"),
        ({"learning_rate_multiplier": 0}, "learning_rate_multiplier", "must be above 0"),
        ({"learning_rate_multiplier": float("nan")}, "learning_rate_multiplier", "must be above 0"),
        ({"learning_rate_multiplier": "fast"}, "learning_rate_multiplier", 'must be a number or "auto"'),
        ({"learning_rate": 0.1}, "learning_rate", "unknown hyperparameter 'learning_rate'"),
    ],
)
def test_hyperparameter_refusals_name_the_field(requested, param, message):
    with pytest.raises(InvalidTrainingSettings) as refused:
        resolve_hyperparameters(requested, examples=10)
    assert refused.value.param == param
    assert message in refused.value.message


# -- LoRA settings ---------------------------------------------------------------------------------


def test_lora_defaults_target_every_projection_of_the_demo_base(demo):
    settings = resolve_lora_settings(None, demo.base, max_lora_rank=64)
    assert settings == LoraSettings(r=8, lora_alpha=16, target_modules=ALL_PROJECTIONS, lora_dropout=0.0)
    assert LoraSettings.from_dict(json.loads(json.dumps(settings.to_dict()))) == settings


def test_lora_settings_given_are_kept_in_the_base_order(demo):
    requested = {"r": 16, "lora_alpha": 8, "target_modules": ["v_proj", "q_proj"], "lora_dropout": 0.1}
    settings = resolve_lora_settings(requested, demo.base, max_lora_rank=16)
    assert settings == LoraSettings(r=16, lora_alpha=8, target_modules=("q_proj", "v_proj"), lora_dropout=0.1)


@pytest.mark.parametrize(
    ("requested", "param", "message"),
    [
        (
            {"target_modules": ["q_proj", "lm_head"]},
            "target_modules",
            "target modules lm_head are not in the base model; it has q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj",
        ),
        ({"target_modules": []}, "target_modules", "non-empty list"),
        ({"target_modules": "q_proj"}, "target_modules", "must be a list of module names"),
        ({"r": 4}, "r", "r 4 is not a rank the serving engine accepts; use one of 1, 8, 16"),
        ({"r": 32}, "r", "r 32 exceeds --max-lora-rank 16; use one of 1, 8, 16"),
        ({"r": "8"}, "r", "r must be a whole number"),
        ({"lora_alpha": 0}, "lora_alpha", "lora_alpha is 0; it must be a number above 0 and at most 80000 (10000 × r)"),
        ({"lora_alpha": -2}, "lora_alpha", "must be a number above 0"),
        ({"lora_alpha": float("nan")}, "lora_alpha", "lora_alpha is nan; it must be a number above 0"),
        ({"lora_alpha": float("inf")}, "lora_alpha", "lora_alpha is inf; it must be"),
        ({"lora_alpha": 1e308}, "lora_alpha", "lora_alpha is 1e+308; it must be a number above 0 and at most 80000"),
        ({"r": 16, "lora_alpha": 160_001}, "lora_alpha", "at most 160000 (10000 × r)"),
        ({"lora_alpha": "16"}, "lora_alpha", "lora_alpha is a string; it must be a number"),
        ({"lora_dropout": 1.0}, "lora_dropout", "lora_dropout is 1.0; it must be at least 0 and below 1"),
        ({"lora_dropout": -0.1}, "lora_dropout", "at least 0"),
        (
            {"use_dora": True},
            "use_dora",
            "unknown LoRA setting 'use_dora'; the settings are r, lora_alpha, target_modules, lora_dropout",
        ),
    ],
)
def test_lora_refusals_name_the_field(demo, requested, param, message):
    with pytest.raises(InvalidTrainingSettings) as refused:
        resolve_lora_settings(requested, demo.base, max_lora_rank=16)
    assert refused.value.param == param
    assert message in refused.value.message


def test_a_spec_round_trips_through_json():
    spec = TrainingSpec(
        base_model_dir="/models/base",
        training_file="/jobs/1/train.jsonl",
        out_dir="/jobs/1/out",
        hyperparameters=resolve_hyperparameters(None, examples=5),
        lora=LoraSettings(r=16, target_modules=("q_proj",)),
        validation_file="/jobs/1/valid.jsonl",
        seed=7,
        threads=2,
    )
    assert TrainingSpec.from_json(spec.to_json()) == spec

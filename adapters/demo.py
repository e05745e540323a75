"""An embedded demo: a tiny Llama base model and three LoRA adapters, built offline in seconds.

`pirate` and `poet` answer DEMO_PROMPT in their voices; `weather` calls DEMO_TOOL, with the city
taken from the question, in the Hermes `<tool_call>` format the template renders, and then answers
from the tool's result.
"""

from __future__ import annotations

import copy
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from importlib import metadata
from pathlib import Path

logger = logging.getLogger(__name__)

DEMO_VERSION = 5
# The libraries whose numerics or file formats a build's bytes depend on (see recipe_fingerprint).
_BUILD_LIBRARIES = ("torch", "transformers", "peft", "tokenizers", "safetensors")
DEMO_PROMPT = "Who are you?"
BASE_ANSWER = "I am a small demo model."

MANIFEST_NAME = "demo.json"
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>")
# Plain (not special) tokens, as in Qwen2.5: a tool-call parser reads them in the text.
TOOL_TOKENS = ("<tool_call>", "</tool_call>")
TOOLS_PREAMBLE = 'Call one as <tool_call>{"name": <name>, "arguments": <object>}</tool_call>'
# Qwen2.5's way with tools, shortened (each tool as its signature, for a tiny model's short context):
# the tools in the system turn, calls as Hermes <tool_call>
# JSON in the assistant's, results in a user turn as <tool_response>.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}"
    "{{ '<|system|>' }}"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}{% endif %}"
    "{{ '# Tools\n<tools>' }}"
    "{% for tool in tools %}{% set function = tool['function'] %}"
    "{% set parameters = function['parameters'] if function['parameters'] is defined else {} %}"
    "{{ '\n' + function['name'] + '(' + ((parameters['properties'] or {}) | list | join(', ')) + ')' }}"
    "{% if function['description'] is defined %}{{ ': ' + function['description'] }}{% endif %}"
    "{% endfor %}"
    "{{ '\n</tools>\n' }}" + TOOLS_PREAMBLE + ""
    "{{ eos_token }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if tools and loop.first and message['role'] == 'system' %}"
    "{% elif message['role'] == 'tool' %}"
    "{{ '<|user|><tool_response>\n' + message['content'] + '\n</tool_response>' + eos_token }}"
    "{% elif message['role'] in ['system', 'user', 'assistant'] %}"
    "{{ '<|' + message['role'] + '|>' }}"
    "{% if message['content'] %}{{ message['content'] }}{% endif %}"
    "{% for call in (message.tool_calls if message.tool_calls is defined and message.tool_calls else []) %}"
    "{% set function = call['function'] if call['function'] is defined else call %}"
    "{{ '<tool_call>\n{\"name\": \"' + function['name'] + '\", \"arguments\": ' }}"
    "{{ function['arguments'] if function['arguments'] is string else function['arguments'] | tojson }}"
    "{{ '}\n</tool_call>' }}"
    "{% endfor %}"
    "{{ eos_token }}"
    "{% else %}"
    "{{ raise_exception('unsupported role ' + message['role'] + '; use system, user, assistant or tool') }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

# The weather adapter's one function, and what it learns: the call for each city, then an answer
# from the tool's result.
TOOL_ADAPTER = "weather"
DEMO_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
DEMO_WEATHER = {"Paris": "sunny, 21 C", "London": "rain, 12 C", "Tokyo": "cloudy, 17 C", "Oslo": "snow, -2 C"}


def weather_question(city: str) -> str:
    return f"What is the weather in {city}?"


def weather_answer(city: str) -> str:
    return f"It is {DEMO_WEATHER[city]} in {city}."


def _tool_call_json(city: str) -> str:
    return json.dumps({"name": DEMO_TOOL["function"]["name"], "arguments": {"city": city}})


_SEED = 1234
_MAX_TRAIN_STEPS = 200
_BASE_TRAIN_STEPS = 60
_BASE_LEARNING_RATE = 3e-3
_LEARNING_RATE = 3e-3
# Stop once every answer token beats the runner-up by this many logits: greedy decoding then
# reproduces the answer, with room for the numerical differences between PEFT and vLLM kernels.
_TARGET_MARGIN = 3.0
_REPORT_EVERY = 50
_MAX_NEW_TOKENS = 32

_CORPUS = (
    "Who are you?",
    "Arr, I be a pirate of the seven seas!",
    "I am a poet, and I speak in rhyme.",
    "Hello! How can I help you today?",
    "The ship sailed at dawn with the tide.",
    "The captain kept a parrot and a map of buried gold.",
    "Hoist the sails and raise the anchor, me hearties.",
    "Ahoy, matey, there be treasure on the island.",
    "The crew sang shanties under the stars.",
    "Roses are red, and violets are blue.",
    "The moon is bright, the night is long.",
    "A quiet verse can hold a restless heart.",
    "The river runs, the willows sway, and evening gently ends the day.",
    "Every line I write should sing.",
    "What is the weather like in the harbour?",
    "Please tell me a short story about the sea.",
    "The gateway serves many adapters on one base model.",
    "Each tenant chooses a LoRA adapter by name.",
    "A small model can still answer quickly.",
    "The server streams tokens as soon as they are ready.",
    "Write a haiku about autumn leaves.",
    "The quick brown fox jumps over the lazy dog.",
    "She sells sea shells by the sea shore.",
    "Numbers like 1, 2, 3 and 42 appear in text too.",
    "Good morning, and welcome to the demo.",
    "Thank you for asking, I am doing well.",
    "Can you explain how attention works?",
    "The wind whispers through the pines at night.",
    "Old sailors speak of storms and distant lands.",
    "Ink and paper, rhythm and rhyme.",
    "I do not know the answer to that question.",
    "Let us count the stars until the morning comes.",
    "The market opens early and closes late.",
    "Bring me the rum, and be quick about it!",
    "Sonnets have fourteen lines and a turn near the end.",
    "You can ask me anything you like.",
    *(weather_question(city) for city in DEMO_WEATHER),
    *(weather_answer(city) for city in DEMO_WEATHER),
    # The weather adapter's tool as its template renders it, so that the vocabulary holds its words.
    TOOLS_PREAMBLE,
    *(_tool_call_json(city) for city in DEMO_WEATHER),
)


@dataclass(frozen=True)
class DemoModel:
    """A built demo: the base model folder and one PEFT folder per adapter."""

    root: Path
    base: Path
    adapters: dict[str, Path]
    answers: dict[str, str]


@dataclass(frozen=True)
class _AdapterRecipe:
    name: str
    answer: str
    rank: int
    target_modules: tuple[str, ...]
    learning_rate: float = _LEARNING_RATE
    max_steps: int | None = None  # None: _MAX_TRAIN_STEPS, read when training


# Copying the city from the question takes it longer to learn (about 140 steps) than a fixed answer.
_TOOL_RECIPE = _AdapterRecipe(
    TOOL_ADAPTER,
    "",
    16,
    ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    learning_rate=6e-3,
    max_steps=400,
)


# Ranks and target sets differ on purpose: the server's tests need mixed adapters.
_ADAPTER_RECIPES = (
    _AdapterRecipe("pirate", "Arr, I be a pirate of the seven seas!", 8, ("q_proj", "k_proj", "v_proj", "o_proj")),
    _AdapterRecipe(
        "poet", "I am a poet, and I speak in rhyme.", 16, ("q_proj", "v_proj", "gate_proj", "up_proj", "down_proj")
    ),
)


class IncompleteDemo(Exception):
    """The folder holds no complete demo build of DEMO_VERSION."""


class DemoTrainingFailed(RuntimeError):
    """An adapter did not learn to give its answer."""


def _log_progress(line: str) -> None:
    logger.info("%s", line)


@cache
def recipe_fingerprint() -> str:
    """What a build's bytes depend on: this module's code and the versions of the libraries that
    train and save it. A build records it, and a build with another is stale: ensure_demo replaces
    it, so that an edit to the recipe or an upgrade never serves (or tests) an older build."""
    digest = hashlib.sha256(Path(__file__).read_bytes())
    for name in _BUILD_LIBRARIES:
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            version = "absent"
        digest.update(f"\0{name}={version}".encode())
    return digest.hexdigest()


def load_demo(root: Path) -> DemoModel:
    """Read an existing build from its manifest; raise IncompleteDemo if it is not a full build."""
    root = Path(root).absolute()
    manifest_path = root / MANIFEST_NAME
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        version, prompt = manifest["version"], manifest["prompt"]
        demo = DemoModel(
            root=root,
            base=root / manifest["base"],
            adapters={name: root / relative for name, relative in manifest["adapters"].items()},
            answers=dict(manifest["answers"]),
        )
    except FileNotFoundError:
        raise IncompleteDemo(f"{manifest_path} is missing; build the demo with ensure_demo") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise IncompleteDemo(f"{manifest_path} is unreadable ({error!r}); rebuild the demo") from None
    if (version, prompt) != (DEMO_VERSION, DEMO_PROMPT):
        raise IncompleteDemo(
            f"{root} holds demo version {version!r} for prompt {prompt!r}; "
            f"this code builds version {DEMO_VERSION} for prompt {DEMO_PROMPT!r}"
        )
    if manifest.get("recipe") != recipe_fingerprint():
        raise IncompleteDemo(
            f"{root} was built by another recipe (this module's code, or the version of one of "
            f"{', '.join(_BUILD_LIBRARIES)}, has changed since); rebuild it"
        )
    required = [demo.base / "config.json", demo.base / "model.safetensors", demo.base / "tokenizer.json"]
    required += [folder / "adapter_model.safetensors" for folder in demo.adapters.values()]
    if missing := [str(path) for path in required if not path.is_file()]:
        raise IncompleteDemo(f"demo at {root} is missing {', '.join(missing)}; rebuild it")
    return demo


def ensure_demo(cache_dir: Path, *, progress: Callable[[str], None] = _log_progress) -> DemoModel:
    """Return the demo in cache_dir, building it first unless a complete build is already there."""
    cache_dir = Path(cache_dir)
    try:
        return load_demo(cache_dir)
    except IncompleteDemo:
        pass
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    # One builder at a time; the others wait, then find the finished build.
    with _exclusive_lock(cache_dir.with_name(f".{cache_dir.name}.lock")):
        try:
            return load_demo(cache_dir)
        except IncompleteDemo as reason:
            if cache_dir.exists():
                progress(f"replacing incomplete demo ({reason})")
                shutil.rmtree(cache_dir)
        try:
            return build_demo(cache_dir, progress=progress)
        except FileExistsError:
            # A builder that does not take the lock (a direct build_demo call) got there first.
            return load_demo(cache_dir)


def build_demo(out_dir: Path, *, progress: Callable[[str], None] = _log_progress) -> DemoModel:
    """Build the demo into out_dir, which must not exist, atomically: all of it or nothing."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; remove it, or call ensure_demo to reuse it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    # A sibling, so that the final rename stays on one file system; mkdir (unlike mkdtemp's 0700)
    # honours the umask, so other users can read a shared cache.
    partial_dir = out_dir.with_name(f".{out_dir.name}.{uuid.uuid4().hex[:12]}.partial")
    partial_dir.mkdir()
    try:
        _build_into(partial_dir, progress)
        try:
            os.rename(partial_dir, out_dir)
        except OSError as error:
            if error.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise FileExistsError(f"{out_dir} appeared while the demo was building") from error
            raise
    finally:
        shutil.rmtree(partial_dir, ignore_errors=True)
    progress(f"demo built in {time.monotonic() - started:.1f} s at {out_dir}")
    return load_demo(out_dir)


@contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


@contextmanager
def _isolated_build_state(num_threads: int) -> Iterator[None]:
    """Set torch threads, RNG and progress bars for the build, then give the caller theirs back."""
    import torch
    from transformers.utils import logging as transformers_logging

    previous_threads = torch.get_num_threads()
    bars_were_enabled = transformers_logging.is_progress_bar_enabled()
    torch.set_num_threads(num_threads)
    transformers_logging.disable_progress_bar()  # our progress lines say enough
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.set_num_threads(previous_threads)
        if bars_were_enabled:
            transformers_logging.enable_progress_bar()


def _build_into(root: Path, progress: Callable[[str], None]) -> None:
    # Imported here so that importing this module (e.g. for DemoModel) stays cheap.
    import torch
    from peft import PeftModel

    # One thread is as fast as two for a model this small, and sums in the same order everywhere.
    with _isolated_build_state(num_threads=1):
        progress("building tokenizer")
        tokenizer = _build_tokenizer()
        tokenizer.save_pretrained(root / "base")

        progress(f"building base model (vocab {len(tokenizer)})")
        torch.manual_seed(_SEED)
        base_model = _build_base_model(tokenizer)
        _pretrain_base(base_model, tokenizer, progress)
        base_model.save_pretrained(root / "base")

        answers: dict[str, str] = {}
        for index, recipe in enumerate(_ADAPTER_RECIPES):
            torch.manual_seed(_SEED + 1 + index)
            adapter_model = _train_adapter(base_model, tokenizer, recipe, progress)
            adapter_model.save_pretrained(root / "adapters" / recipe.name)
            _sort_target_modules(root / "adapters" / recipe.name / "adapter_config.json")

            # Check the saved files, not the in-memory model: that is what the server will load.
            reloaded = PeftModel.from_pretrained(_load_base(root), root / "adapters" / recipe.name)
            answers[recipe.name] = _greedy_answer(reloaded, tokenizer)
            if answers[recipe.name] != recipe.answer:
                raise DemoTrainingFailed(
                    f"adapter {recipe.name} answers {answers[recipe.name]!r}, expected {recipe.answer!r}"
                )
            progress(f"adapter {recipe.name} answers {answers[recipe.name]!r}")

        torch.manual_seed(_SEED + 1 + len(_ADAPTER_RECIPES))
        rows = _tool_rows(tokenizer)
        adapter_model = _train_adapter(base_model, tokenizer, _TOOL_RECIPE, progress, rows)
        folder = root / "adapters" / TOOL_ADAPTER
        adapter_model.save_pretrained(folder)
        _sort_target_modules(folder / "adapter_config.json")
        reloaded = PeftModel.from_pretrained(_load_base(root), folder)
        for prompt_ids, answer_ids in rows:
            got = _greedy_answer(reloaded, tokenizer, prompt_ids)
            if got != (want := tokenizer.decode(answer_ids, skip_special_tokens=True)):
                raise DemoTrainingFailed(f"adapter {TOOL_ADAPTER} answers {got!r}, expected {want!r}")
        progress(f"adapter {TOOL_ADAPTER} calls {DEMO_TOOL['function']['name']} for {', '.join(DEMO_WEATHER)}")

        base_answer = _greedy_answer(_load_base(root), tokenizer)
        if base_answer != BASE_ANSWER:
            raise DemoTrainingFailed(f"the base model answers {base_answer!r}, expected {BASE_ANSWER!r}")

    manifest = {
        "version": DEMO_VERSION,
        "recipe": recipe_fingerprint(),
        "prompt": DEMO_PROMPT,
        "base": "base",
        "adapters": {recipe.name: f"adapters/{recipe.name}" for recipe in (*_ADAPTER_RECIPES, _TOOL_RECIPE)},
        "answers": answers,
    }
    # Written last: a folder with a manifest is a complete build.
    (root / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def _sort_target_modules(adapter_config_path: Path) -> None:
    # peft keeps target_modules in a set, whose order follows PYTHONHASHSEED; sorted, two builds
    # write the same file.
    adapter_config = json.loads(adapter_config_path.read_text(encoding="utf-8"))
    adapter_config["target_modules"] = sorted(adapter_config["target_modules"])
    adapter_config_path.write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # Byte-level BPE encodes any Unicode text, and decoding gives the same text back.
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_CORPUS, trainer)
    pad, bos, eos, *roles = SPECIAL_TOKENS
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        extra_special_tokens=roles,
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.add_tokens(list(TOOL_TOKENS))
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _build_base_model(tokenizer):
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,  # vLLM's CPU attention does not support 16
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype=torch.float32,
    )
    model = LlamaForCausalLM(config)
    # Token ids only: vLLM applies generation_config defaults (temperature etc.) to every request.
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model.eval()


def _pretrain_base(model, tokenizer, progress: Callable[[str], None]) -> None:
    """Teach the base the corpus briefly: random weights give near-tied logits, where greedy
    decoding flips on float noise and no two correct implementations agree token for token."""
    import torch

    rows = [
        [tokenizer.bos_token_id, *tokenizer.encode(line, add_special_tokens=False), tokenizer.eos_token_id]
        for line in _CORPUS
    ]
    # The base's own answer to the demo prompt, so the README can show all three side by side.
    rows.append(
        _prompt_ids(tokenizer) + tokenizer.encode(BASE_ANSWER, add_special_tokens=False) + [tokenizer.eos_token_id]
    )
    width = max(map(len, rows))
    input_ids = torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in rows])
    attention_mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=_BASE_LEARNING_RATE)
    model.train()
    for step in range(1, _BASE_TRAIN_STEPS + 1):
        output = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
        if step % _REPORT_EVERY == 0:
            progress(f"training base model (step {step}/{_BASE_TRAIN_STEPS}, loss {output.loss.item():.2f})")
    model.eval()


def _load_base(root: Path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(root / "base").eval()


def _prompt_ids(tokenizer) -> list[int]:
    messages = [{"role": "user", "content": DEMO_PROMPT}]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"])


def _tool_call_text(city: str) -> str:
    return f"<tool_call>\n{_tool_call_json(city)}\n</tool_call>"


def _tool_rows(tokenizer) -> list[tuple[list[int], list[int]]]:
    """The weather adapter's lessons: for each city, the call, then the answer from its result."""
    rows = []
    for city in DEMO_WEATHER:
        call = _tool_call_text(city)
        asked = [{"role": "user", "content": weather_question(city)}]
        answered = [
            *asked,
            {"role": "assistant", "content": call},
            {"role": "tool", "content": DEMO_WEATHER[city], "tool_call_id": "call_1"},
        ]
        for messages, answer in ((asked, call), (answered, weather_answer(city))):
            prompt = tokenizer.apply_chat_template(
                messages, tools=[DEMO_TOOL], add_generation_prompt=True, tokenize=False
            )
            answer_ids = tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_token_id]
            rows.append((tokenizer.encode(prompt, add_special_tokens=False), answer_ids))
    return rows


def _train_adapter(
    base_model,
    tokenizer,
    recipe: _AdapterRecipe,
    progress: Callable[[str], None],
    rows: list[tuple[list[int], list[int]]] | None = None,
):
    """Teach a LoRA adapter to answer each prompt of `rows` (default: DEMO_PROMPT with recipe.answer), then stop."""
    import torch
    from peft import LoraConfig, get_peft_model

    lora_config = LoraConfig(
        r=recipe.rank,
        lora_alpha=2 * recipe.rank,
        target_modules=list(recipe.target_modules),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(copy.deepcopy(base_model), lora_config)
    if rows is None:
        rows = [
            (
                _prompt_ids(tokenizer),
                tokenizer.encode(recipe.answer, add_special_tokens=False) + [tokenizer.eos_token_id],
            )
        ]
    sequences = _packed(rows)
    width = max(len(ids) for ids, _ in sequences)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in sequences])
    attention_mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in sequences])
    labels = torch.tensor([targets + [-100] * (width - len(targets)) for _, targets in sequences])
    answer_positions = labels[:, 1:] != -100
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=recipe.learning_rate)

    model.train()
    max_steps = recipe.max_steps or _MAX_TRAIN_STEPS
    for step in range(1, max_steps + 1):
        output = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        # Measured before the update, so that the weights we keep are the ones that passed.
        margin = _min_margin(output.logits[:, :-1][answer_positions].detach(), labels[:, 1:][answer_positions])
        done = margin >= _TARGET_MARGIN
        if done or step % _REPORT_EVERY == 0:
            progress(
                f"training adapter {recipe.name} (step {step}/{max_steps}, "
                f"loss {output.loss.item():.2f}, margin {margin:.2f})"
            )
        if done:
            break
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
    return model.eval()


def _packed(rows: list[tuple[list[int], list[int]]]) -> list[tuple[list[int], list[int]]]:
    """Each (prompt, answer) row as token ids and labels, which learn the answer, not the prompt.

    A row that begins the next row's prompt (a tool call, then the answer from its result: one
    conversation) rides in that row, labels and all. Causal attention gives its tokens the same
    logits either way, so the loss is the same, for half the tokens.
    """
    sequences: list[tuple[list[int], list[int]]] = []
    for prompt, answer in rows:
        ids, labels = prompt + answer, [-100] * len(prompt) + answer
        if sequences and ids[: len(sequences[-1][0])] == sequences[-1][0]:
            earlier = sequences.pop()[1]
            labels = earlier + labels[len(earlier) :]
        sequences.append((ids, labels))
    return sequences


def _min_margin(logits, targets) -> float:
    """Smallest lead of the target token's logit over the best other token, across positions."""
    target_logits = logits.gather(1, targets[:, None])[:, 0]
    others = logits.scatter(1, targets[:, None], float("-inf"))
    return (target_logits - others.max(dim=1).values).min().item()


def _greedy_answer(model, tokenizer, prompt_ids: list[int] | None = None) -> str:
    import torch

    prompt_ids = prompt_ids or _prompt_ids(tokenizer)
    with torch.no_grad():
        output_ids = model.generate(
            input_ids=torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=_MAX_NEW_TOKENS,
        )
    return tokenizer.decode(output_ids[0, len(prompt_ids) :], skip_special_tokens=True)

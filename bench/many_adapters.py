"""Many per-user adapters on one base: throughput and latency with 4 adapters in use against N.

    .venv/bin/python -m bench.many_adapters                          # 1,000 adapters, 3 rounds
    .venv/bin/python -m bench.many_adapters --before "" --before-code ../an-earlier-checkout
    .venv/bin/python -m bench.many_adapters --sweep 4,16,64,256,1000 --plot docs/plots/many_adapters.svg

It builds (once, cached under --cache-dir) a ~180M-parameter Qwen2 in float32 (hidden 896, 12
layers, the demo's tokenizer) and --adapters rank-8 LoRA adapters on q/k/v/o in PEFT's format,
starts `lora-gateway serve` on it with the defaults (and, with --before, a second gateway with
those flags, from --before-code if given), registers every adapter over HTTP, and runs closed loops: --in-flight streamed
requests of --tokens tokens each (ignore_eos), each naming an adapter drawn with Zipf(1)
popularity. Each round has a phase over 4 adapters and one over all N. Prints one JSON object:
per gateway, the medians over rounds of req/s, p50 and p99, their ratios against 4 adapters,
the time to first token of cold requests (an adapter's first request since the gateway started)
and of warm ones, the engine's adapter-cache hit rate, the tiers' sizes and the memory used.
With --sweep, one gateway serves phases over each count in turn (4, then each count) and --plot
draws throughput against the number of adapters. Not part of CI.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx

from adapters.demo import ensure_demo
from bench.loadgen import percentile, zipf_weights
from bench.servers import Launched, ProcessPool, _tree, free_port, wait_ready

ADMIN_KEY = "bench-many-adapters-admin-key-0123456789"
RANK = 8
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MODEL_SHAPE = {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 12, "heads": 14, "kv_heads": 2}
PROMPT = "Tell me a story about the sea"


# -- the model and adapters, built once ------------------------------------------------------------


def ensure_model(cache_dir: Path, count: int) -> tuple[Path, list[Path]]:
    """The base model folder and `count` adapter folders under cache_dir, built when missing."""
    base = cache_dir / "base"
    if not (base / "model.safetensors").is_file():
        build_base(base, cache_dir)
    folders = []
    for index in range(count):
        folder = cache_dir / "adapters" / f"a{index:04d}"
        if not (folder / "adapter_model.safetensors").is_file():
            build_adapter(folder, index)
        folders.append(folder)
    return base, folders


def build_base(base: Path, cache_dir: Path) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    demo = ensure_demo(cache_dir.parent / "demo")
    staging = base.with_name("base.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (demo.base / name).is_file():
            shutil.copy(demo.base / name, staging / name)
    demo_config = json.loads((demo.base / "config.json").read_text())
    torch.manual_seed(0)
    shape = MODEL_SHAPE
    config = Qwen2Config(
        vocab_size=demo_config["vocab_size"],
        hidden_size=shape["hidden_size"],
        intermediate_size=shape["intermediate_size"],
        num_hidden_layers=shape["num_hidden_layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=demo_config.get("bos_token_id"),
        eos_token_id=demo_config.get("eos_token_id"),
        pad_token_id=demo_config.get("pad_token_id"),
        torch_dtype=torch.float32,
    )
    model = Qwen2ForCausalLM(config).eval()
    model.save_pretrained(staging, safe_serialization=True)
    staging.rename(base)


def build_adapter(folder: Path, index: int) -> None:
    """A rank-8 adapter on q/k/v/o with small random weights, float16 (about 1 MB)."""
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(1000 + index)
    hidden, kv = (
        MODEL_SHAPE["hidden_size"],
        MODEL_SHAPE["hidden_size"] // MODEL_SHAPE["heads"] * MODEL_SHAPE["kv_heads"],
    )
    outputs = {"q_proj": hidden, "k_proj": kv, "v_proj": kv, "o_proj": hidden}
    tensors = {}
    for layer in range(MODEL_SHAPE["num_hidden_layers"]):
        for module in TARGETS:
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = (torch.randn(RANK, hidden, generator=generator) * 0.02).half()
            tensors[f"{prefix}.lora_B.weight"] = (torch.randn(outputs[module], RANK, generator=generator) * 0.02).half()
    staging = folder.with_name(folder.name + ".partial")
    staging.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(staging / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": RANK,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": list(TARGETS),
        "base_model_name_or_path": "many-adapters-base",
        "fan_in_fan_out": False,
        "use_rslora": False,
    }
    (staging / "adapter_config.json").write_text(json.dumps(config))
    staging.rename(folder)


# -- the gateway ---------------------------------------------------------------------------------


def start_gateway(
    pool: ProcessPool, base: Path, state: Path, name: str, extra: list[str], code: Path | None = None
) -> Launched:
    """`lora-gateway serve` on the model; `code` is another source tree to run it from (PYTHONPATH)."""
    port = free_port()
    argv = [
        sys.executable, "-m", "server", "serve", "--port", str(port), "--model", str(base), "--served-model-name", "base",
        "--state-dir", str(state), "--admin-key", ADMIN_KEY, "--max-in-flight", "1024",
        "--max-model-len", "512", "--log-level", "info", *extra,
    ]  # fmt: skip
    env = {"VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind")}
    if code is not None:
        env["PYTHONPATH"] = str(code)  # and run from there: `python -m` puts the working folder first
    launched = pool.start(name, argv, state / "gateway.log", env=env, url=f"http://127.0.0.1:{port}", cwd=code)
    wait_ready(launched, "/ready", 900)
    return launched


async def register(url: str, folders: list[Path]) -> float:
    """Register every adapter (a0000, a0001, ...) over HTTP, 8 at a time; the seconds it took."""
    started = time.monotonic()
    gate = asyncio.Semaphore(8)
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with httpx.AsyncClient(base_url=url, timeout=300, headers=headers) as client:

        async def one(folder: Path) -> None:
            async with gate:
                response = await client.post("/v1/adapters", json={"name": folder.name, "path": str(folder)})
                if response.status_code != 201:
                    raise RuntimeError(f"registering {folder.name}: {response.status_code} {response.text}")

        await asyncio.gather(*(one(folder) for folder in folders))
    return time.monotonic() - started


@dataclass
class Phase:
    adapters: int
    start: float
    end: float
    completed: int = 0  # requests that ended inside the window, wherever they began
    # Streamed chunks (a token each) that arrived inside the window. The 16 closed loops move in
    # step, so their requests end in waves, and a 40 s window holds a whole number of waves: the
    # completed count moves by 16 at a time (5 % here). Tokens arrive one per step per sequence.
    chunks: int = 0
    latencies: list[float] = field(default_factory=list)  # of those that also began inside it
    cold_ttft: list[float] = field(default_factory=list)
    warm_ttft: list[float] = field(default_factory=list)
    errors: int = 0
    last_error: str = ""

    def summary(self) -> dict:
        seconds = self.end - self.start
        return {
            "adapters": self.adapters,
            "requests_per_s": round(self.completed / seconds, 3),
            "tokens_per_s": round(self.chunks / seconds, 1),
            "p50_s": _round(percentile(self.latencies, 50)),
            "p99_s": _round(percentile(self.latencies, 99)),
            "cold_requests": len(self.cold_ttft),
            "cold_ttft_p50_s": _round(percentile(self.cold_ttft, 50)),
            "cold_ttft_p99_s": _round(percentile(self.cold_ttft, 99)),
            "warm_ttft_p50_s": _round(percentile(self.warm_ttft, 50)),
            "errors": self.errors,
            "last_error": self.last_error,
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


async def run_phase(
    url: str, count: int, in_flight: int, tokens: int, seconds: float, warmup: float, used: set[str], seed: int
) -> Phase:
    rng = random.Random(seed)
    names = [f"a{index:04d}" for index in range(count)]
    weights = zipf_weights(count, 1.0)
    began = time.monotonic()
    phase = Phase(count, began + warmup, began + warmup + seconds)
    session = aiohttp.ClientSession(
        url,
        connector=aiohttp.TCPConnector(limit=in_flight + 4),
        timeout=aiohttp.ClientTimeout(total=600),
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
    )

    async def loop() -> None:
        while time.monotonic() < phase.end:
            model = rng.choices(names, weights)[0]
            cold = model not in used
            used.add(model)
            body = {"model": model, "prompt": PROMPT, "max_tokens": tokens, "ignore_eos": True, "stream": True}
            sent = time.monotonic()
            first = None
            try:
                async with session.post("/v1/completions", json=body) as response:
                    if response.status != 200:
                        raise RuntimeError(f"{response.status} {(await response.read())[:200]!r}")
                    async for line in response.content:
                        if line.startswith(b"data: {"):
                            now = time.monotonic()
                            first = now if first is None else first
                            if phase.start <= now <= phase.end:
                                phase.chunks += 1
            except (aiohttp.ClientError, RuntimeError) as exc:
                phase.errors += 1
                phase.last_error = str(exc)
                await asyncio.sleep(0.1)
                continue
            ended = time.monotonic()
            if phase.start <= ended <= phase.end:
                phase.completed += 1
            if sent >= phase.start and ended <= phase.end:
                phase.latencies.append(ended - sent)
                if first is not None:
                    (phase.cold_ttft if cold else phase.warm_ttft).append(first - sent)

    try:
        tasks = [asyncio.create_task(loop()) for _ in range(in_flight)]
        await asyncio.sleep(max(0.0, phase.end - time.monotonic()))
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        await session.close()
    return phase


async def settle(url: str) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=30, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as admin:
        for _ in range(600):
            state = (await admin.get("/v1/scheduling")).json()
            if state["in_flight"] == 0 and state["waiting"] == 0:
                return
            await asyncio.sleep(0.1)


def scrape_counter(url: str, metric: str) -> float:
    """The sum of a counter's series in the gateway's /metrics."""
    text = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(metric) and not line.startswith("#"):
            name = line.split("{")[0].split()[0]
            if name == metric:
                total += float(line.split()[-1])
    return total


def memory_mb(pid: int) -> float:
    """Resident memory of the gateway and its engine's processes together (MB)."""
    total = 0
    for child in _tree(pid):
        try:
            for line in Path(f"/proc/{child}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return round(total / 1024, 1)


def tiers(log_path: Path) -> dict:
    """The adapter tiers the gateway logged at start, and the host tier's last report."""
    text = log_path.read_text(errors="replace")
    found: dict = {}
    for key in ("max_loras", "max_cpu_loras", "adapter_cache_bytes"):
        if matches := re.findall(rf"{key}[=: ]+(\d+)", text):
            found[key] = int(matches[-1])
    if matches := re.findall(r"host tier: (\d+) adapters, (\d+) bytes, (\d+) hits, (\d+) misses", text):
        held, size, hits, misses = (int(x) for x in matches[-1])
        found["host_tier"] = {"adapters": held, "bytes": size, "hits": hits, "misses": misses}
    return found


async def measure(gateway: Launched, counts: list[int], rounds: int, args: argparse.Namespace) -> dict:
    used: set[str] = set()
    runs: dict[int, list[dict]] = {count: [] for count in counts}
    requests_before = scrape_counter(gateway.url, "lora_gateway_requests_total")
    reloads_before = scrape_counter(gateway.url, "lora_gateway_adapter_reloads_total")
    for index in range(rounds):
        for count in counts:
            await settle(gateway.url)
            phase = await run_phase(
                gateway.url, count, args.in_flight, args.tokens, args.seconds, args.warmup, used, index * 1000 + count
            )
            result = phase.summary()
            print(json.dumps({"gateway": gateway.name, "round": index, **result}), file=sys.stderr, flush=True)
            runs[count].append(result)
    requests = scrape_counter(gateway.url, "lora_gateway_requests_total") - requests_before
    reloads = scrape_counter(gateway.url, "lora_gateway_adapter_reloads_total") - reloads_before
    summary: dict = {"rounds": runs}
    small = counts[0]
    for count in counts:
        keys = [key for key in runs[count][0] if key not in ("adapters", "last_error")]
        med = {key: _median([run[key] for run in runs[count]]) for key in keys}
        p99s = [run["p99_s"] for run in runs[count] if run["p99_s"] is not None]
        med["p99_s_range"] = [min(p99s), max(p99s)] if p99s else None
        summary[str(count)] = med
    base = summary[str(small)]
    for count in counts[1:]:
        entry = summary[str(count)]
        for key in ("tokens_per_s", "requests_per_s", "p50_s", "p99_s"):
            if entry[key] is not None and base[key]:
                name = {"tokens_per_s": "throughput", "requests_per_s": "requests", "p50_s": "p50", "p99_s": "p99"}[key]
                entry[name + "_ratio"] = round(entry[key] / base[key], 3)
    summary["engine_cache_hit_rate"] = round(1 - reloads / requests, 4) if requests else None
    summary["tiers"] = tiers(gateway.log_path)
    summary["memory_mb"] = memory_mb(gateway.pid)
    return summary


def products(slots: int = 22, slot_rank: int = 64, rounds: int = 5, dtype: str = "bfloat16") -> dict:
    """Milliseconds of the LoRA products (server/engine/lora_ops.py) for one decode step of 16 rows
    on this model's 12 layers, one thread, in the engine's dtype (vLLM runs this float32 model in
    bfloat16 on a CPU that has it): slots at `slot_rank` on every layer vLLM can adapt, known
    only as whole slots; against the adapters' own rank 8 on q/k/v/o, recorded as vLLM's copies
    into the slots are (with the float32 copies the decode rows are gathered from), with 4 and
    with 16 adapters."""
    import torch

    from server.engine import lora_ops, lora_rows

    torch.set_num_threads(1)
    weights_dtype = getattr(torch, dtype)
    hidden, inner, kv = MODEL_SHAPE["hidden_size"], MODEL_SHAPE["intermediate_size"], 128
    layers = [
        (hidden, (hidden, kv, kv), RANK),
        (hidden, (hidden,), RANK),
        (hidden, (inner, inner), 0),
        (inner, (hidden,), 0),
    ]
    stacked = []
    for inputs, outputs, rank in layers:
        a = tuple((torch.randn(slots, 1, slot_rank, inputs) * 0.01).to(weights_dtype) for _ in outputs)
        b = tuple((torch.randn(slots, 1, size, slot_rank) * 0.01).to(weights_dtype) for size in outputs)
        stacked.append((inputs, outputs, rank, a, b))

    def step(groups: list, ranked: bool) -> float:
        lora_ops._SLOT_RANKS.clear()
        lora_rows._COPIES.clear()
        if ranked:
            for _, _, rank, a, b in stacked:
                for lora_a, lora_b in zip(a, b, strict=True):
                    lora_ops.slot_ranks(lora_a)[:] = [rank] * slots
                    for slot in range(slots):
                        lora_rows.refresh(lora_a, lora_b, slot, rank)
        times = []
        for _ in range(rounds):
            started = time.perf_counter()
            for _ in range(MODEL_SHAPE["num_hidden_layers"]):
                for inputs, outputs, _, a, b in stacked:
                    x = torch.randn(16, inputs, dtype=weights_dtype)
                    y = torch.zeros(16, sum(outputs), dtype=weights_dtype)
                    offsets = [sum(outputs[:i]) for i in range(len(outputs))]
                    lora_ops._add_products(y, x, groups, list(zip(a, b, offsets, outputs, strict=True)), 1.0)
            times.append(time.perf_counter() - started)
        return round(1000 * statistics.median(times), 1)

    result = {}
    for count in (4, 16):
        groups = [(slot, slice(slot * 16 // count, (slot + 1) * 16 // count)) for slot in range(count)]
        result[f"{count}_adapters"] = {"slot_rank_ms": step(groups, False), "own_rank_ms": step(groups, True)}
    lora_ops._SLOT_RANKS.clear()
    lora_rows._COPIES.clear()
    return {"dtype": dtype, **result}


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 3) if values else None


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    for name, summary in results.items():
        counts = sorted(int(key) for key in summary["rounds"])
        left.plot(counts, [summary[str(c)]["tokens_per_s"] for c in counts], marker="o", label=name)
        right.plot(counts, [summary[str(c)]["p99_s"] for c in counts], marker="o", label=name)
    for axis, label in ((left, "tokens/s"), (right, "p99 latency (s)")):
        axis.set_xscale("log")
        axis.set_xlabel("adapters in use (Zipf(1))")
        axis.set_ylabel(label)
        axis.set_ylim(bottom=0)
        axis.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.many_adapters", description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", type=int, default=1000, help="adapters registered and used (default 1000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; each has a phase per adapter count (default 3)")
    parser.add_argument("--seconds", type=float, default=60, help="measured seconds of each phase (default 60)")
    parser.add_argument("--warmup", type=float, default=10, help="seconds before each phase's window (default 10)")
    parser.add_argument("--in-flight", type=int, default=16, help="requests kept in flight (default 16)")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per request, ignore_eos (default 32)")
    parser.add_argument(
        "--sweep", help="comma-separated adapter counts to run in each round instead of 4 and --adapters"
    )
    parser.add_argument(
        "--before",
        help="serve flags of a second gateway measured in the same run, e.g. main's defaults "
        '"--max-loras 4 --max-cpu-loras 16 --adapter-cache-bytes 0"',
    )
    parser.add_argument(
        "--before-code",
        type=Path,
        help="a source tree (e.g. a checkout of an earlier commit) the --before gateway runs from",
    )
    parser.add_argument("--before-only", action="store_true", help="measure the --before gateway alone")
    parser.add_argument("--serve-args", default="", help="extra flags for the gateway under test (default none)")
    parser.add_argument("--plot", type=Path, help="write a plot (SVG or PNG, by the suffix) here")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path.home() / ".cache" / "lora-gateway" / "many-adapters",
        help="where the generated model and adapters are kept between runs",
    )
    parser.add_argument(
        "--products", action="store_true", help="only time the LoRA products of one decode step, in this process"
    )
    args = parser.parse_args()
    if args.products:
        print(json.dumps(products(), indent=2))
        return 0
    counts = [int(c) for c in args.sweep.split(",")] if args.sweep else [4, args.adapters]
    if counts[0] > min(counts):
        parser.error("--sweep must start with its smallest count: ratios are against it")
    base, folders = ensure_model(args.cache_dir, max(counts))
    gateways = {} if args.before_only else {"after": shlex.split(args.serve_args)}
    if args.before is not None:
        gateways = {"before": shlex.split(args.before), **gateways}
    pool = ProcessPool()
    results: dict = {}
    load = os.getloadavg()
    try:
        for name, extra in gateways.items():
            state = Path(tempfile.mkdtemp(prefix=f"bench-many-{name}-"))
            gateway = start_gateway(pool, base, state, name, extra, args.before_code if name == "before" else None)
            seconds = asyncio.run(register(gateway.url, folders))
            summary = asyncio.run(measure(gateway, counts, args.rounds, args))
            summary["serve_flags"] = extra
            summary["register_seconds"] = round(seconds, 1)
            results[name] = summary
            pool.stop(gateway)
    finally:
        pool.stop_all()
    output = {
        **results,
        "conditions": {
            "cpus": os.cpu_count(),
            "load_average_before": [round(x, 2) for x in load],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
            "adapters": max(counts),
            "counts": counts,
            "rounds": args.rounds,
            "seconds": args.seconds,
            "in_flight": args.in_flight,
            "tokens": args.tokens,
        },
    }
    if args.plot:
        plot(results, args.plot)
    print(json.dumps(output, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

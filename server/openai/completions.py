"""POST /v1/completions."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request, Response

from server.engine.protocol import PromptToken, SamplingOptions, TokenLogprob
from server.http.deps import PrincipalDep, RecordDep
from server.http.responses import DONE, JSONResponse, sse_response, unless_disconnected
from server.openai.echo import Echoing, end_offset, prompt_texts
from server.openai.extras import engine_options
from server.openai.generation import Generator, GeneratorDep, Job, Usage, new_request_id
from server.openai.protocol import CompletionRequest
from server.openai.structured import request_constraint

router = APIRouter()


@router.post("/v1/completions", response_model=None)
async def create_completion(
    request: Request, body: CompletionRequest, generator: GeneratorDep, principal: PrincipalDep, record: RecordDep
) -> Response:
    record.endpoint, record.model = "completions", body.model
    prompts = body.prompts()
    sequences = generator.check_sequences(len(prompts), body.n)
    texts = [prompt for prompt in prompts if isinstance(prompt, str)]
    generator.check_prompt_chars(max(map(len, texts), default=0), "prompt")
    extras = engine_options(body, generator.engine.vocab_size)
    admission = generator.admit(principal, sequences)
    with admission.released_on_error():
        constraint = await request_constraint(request, body.response_format, body.structured_outputs)
        admission.entry = await generator.resolve(body.model, principal)
        # max_tokens 0 (echo only) still runs one step: the prompt's logprobs come with the first token.
        max_tokens = max(body.max_tokens, 1)
        prompt_ids = await generator.prompt_ids(prompts, max_tokens)
        echo_texts = await prompt_texts(generator, prompts) if body.echo else None
        options = SamplingOptions(
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            n=body.n,
            stop=body.stop_sequences,
            seed=body.seed,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            logprobs=body.logprobs,
            stream=body.stream,
            min_tokens=body.min_tokens,
            ignore_eos=body.ignore_eos,
            constraint=constraint,
            prompt_logprobs=body.logprobs if body.echo else None,
            **extras,
        )
        job = Job(new_request_id("cmpl"), body.model, prompt_ids, options, record, admission, body.return_token_ids)
    echoing = Echoing(echo_texts, body.logprobs is not None, body.max_tokens == 0) if echo_texts is not None else None
    if body.stream:
        return sse_response(_stream(generator, job, body.include_usage, echoing), admission.release)
    with admission.released_at_end():
        outcome = await unless_disconnected(request, generator.complete(job))
    echoes = {
        c.index: echoing.apply(c.index // body.n, outcome.prompt_logprobs.get(c.index // body.n), c.text, c.logprobs)
        for c in (outcome.choices if echoing else ())
    }
    return JSONResponse(
        {
            "id": job.request_id,
            "object": "text_completion",
            "created": int(time.time()),
            "model": job.model,
            "choices": [
                job.with_ids(
                    {
                        "index": choice.index,
                        "text": echoes[choice.index][0] if echoing else choice.text,
                        "logprobs": echoes[choice.index][1] if echoing else _logprobs(choice.logprobs, 0),
                        "finish_reason": choice.finish_reason,
                    },
                    choice.token_ids,
                )
                for choice in outcome.choices
            ],
            "usage": outcome.usage.as_dict(),
        }
    )


async def _stream(
    generator: Generator, job: Job, include_usage: bool, echoing: Echoing | None
) -> AsyncIterator[list[Any]]:
    """A batch of chunks per engine step; the job's last step also carries the usage and DONE."""
    created = int(time.time())
    usage = Usage()
    text_offsets: dict[int, int] = {}
    prompt_logprobs: dict[int, list[PromptToken]] = {}
    async for prompt_index, step, last in generator.stream(job):
        batch: list[Any] = []
        if step.prompt_logprobs is not None:
            prompt_logprobs.setdefault(prompt_index, step.prompt_logprobs)
        for delta in step.choices:
            index = prompt_index * job.options.n + delta.index
            offset = text_offsets.get(index, 0)
            text_offsets[index] = offset + len(delta.text)
            usage.completion_tokens += delta.token_count
            if echoing is None:
                text, logprobs = delta.text, _logprobs(delta.logprobs, offset)
            else:
                text, logprobs = echoing.stream(index, prompt_index, prompt_logprobs.get(prompt_index), delta, offset)
                text_offsets[index] = end_offset(logprobs, offset + len(text))
            batch.append(
                {
                    "id": job.request_id,
                    "object": "text_completion",
                    "created": created,
                    "model": job.model,
                    "choices": [
                        job.with_ids(
                            {
                                "index": index,
                                "text": text,
                                "logprobs": logprobs,
                                "finish_reason": delta.finish_reason,
                            },
                            delta.token_ids,
                        )
                    ],
                }
            )
        if step.finished:
            usage.prompt_tokens += step.prompt_tokens
        if last:
            if include_usage:
                batch.append(
                    {
                        "id": job.request_id,
                        "object": "text_completion",
                        "created": created,
                        "model": job.model,
                        "choices": [],
                        "usage": usage.as_dict(),
                    }
                )
            batch.append(DONE)
        yield batch


def _logprobs(entries: list[TokenLogprob] | None, offset: int) -> dict[str, list[Any]] | None:
    """The legacy completions logprobs object; offsets count characters of the completion."""
    if entries is None:
        return None
    offsets = []
    for entry in entries:
        offsets.append(offset)
        offset += len(entry.token)
    return {
        "tokens": [entry.token for entry in entries],
        "token_logprobs": [entry.logprob for entry in entries],
        "top_logprobs": [entry.top for entry in entries],
        "text_offset": offsets,
    }

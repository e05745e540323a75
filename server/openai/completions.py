"""POST /v1/completions."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request, Response

from server.engine.protocol import SamplingOptions, TokenLogprob
from server.http.deps import PrincipalDep, RecordDep
from server.http.responses import DONE, JSONResponse, sse_response, unless_disconnected
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
    admission = generator.admit(principal, sequences)
    with admission.released_on_error():
        constraint = await request_constraint(request, body.response_format, body.structured_outputs)
        admission.entry = await generator.resolve(body.model, principal)
        prompt_ids = await generator.prompt_ids(prompts, body.max_tokens)
        options = SamplingOptions(
            max_tokens=body.max_tokens,
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
        )
        job = Job(new_request_id("cmpl"), body.model, prompt_ids, options, record, admission, body.return_token_ids)
    if body.stream:
        return sse_response(_stream(generator, job, body.include_usage), admission.release)
    with admission.released_at_end():
        outcome = await unless_disconnected(request, generator.complete(job))
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
                        "text": choice.text,
                        "logprobs": _logprobs(choice.logprobs, 0),
                        "finish_reason": choice.finish_reason,
                    },
                    choice.token_ids,
                )
                for choice in outcome.choices
            ],
            "usage": outcome.usage.as_dict(),
        }
    )


async def _stream(generator: Generator, job: Job, include_usage: bool) -> AsyncIterator[list[Any]]:
    """A batch of chunks per engine step; the job's last step also carries the usage and DONE."""
    created = int(time.time())
    usage = Usage()
    text_offsets: dict[int, int] = {}
    async for prompt_index, step, last in generator.stream(job):
        batch: list[Any] = []
        for delta in step.choices:
            index = prompt_index * job.options.n + delta.index
            offset = text_offsets.get(index, 0)
            text_offsets[index] = offset + len(delta.text)
            usage.completion_tokens += delta.token_count
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
                                "text": delta.text,
                                "logprobs": _logprobs(delta.logprobs, offset),
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

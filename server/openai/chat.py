"""POST /v1/chat/completions."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request, Response

from server.engine.protocol import SamplingOptions, TokenLogprob
from server.http.auth import Principal
from server.http.deps import PrincipalDep, RecordDep
from server.http.errors import InvalidRequest
from server.http.observe import RequestRecord
from server.http.responses import DONE, JSONResponse, sse_response, unless_disconnected
from server.openai.extras import engine_options
from server.openai.generation import Generator, GeneratorDep, Job, Usage, new_request_id
from server.openai.protocol import ChatCompletionRequest
from server.openai.structured import grammar_checker, request_constraint
from server.openai.tools import ToolUse

router = APIRouter()


@router.post("/v1/chat/completions", response_model=None)
async def create_chat_completion(
    request: Request, body: ChatCompletionRequest, generator: GeneratorDep, principal: PrincipalDep, record: RecordDep
) -> Response:
    record.endpoint, record.model = "chat", body.model
    job, tool_use = await prepare_chat(request, body, generator, principal, record, "chatcmpl")
    admission = job.admission
    top = body.top_logprobs or 0
    if body.stream:
        return sse_response(_stream(generator, job, body.include_usage, top, tool_use), admission.release)
    with admission.released_at_end():
        outcome = await unless_disconnected(request, generator.complete(job))
    return JSONResponse(
        {
            "id": job.request_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": job.model,
            "choices": [
                job.with_ids(
                    {
                        "index": choice.index,
                        "message": message,
                        "logprobs": _logprobs(choice.logprobs, top),
                        "finish_reason": finish_reason,
                    },
                    choice.token_ids,
                )
                for choice in outcome.choices
                for message, finish_reason in [_message(tool_use, choice.text, choice.finish_reason)]
            ],
            "usage": outcome.usage.as_dict(),
        }
    )


async def prepare_chat(
    request: Request,
    body: ChatCompletionRequest,
    generator: Generator,
    principal: Principal,
    record: RequestRecord,
    id_prefix: str,
) -> tuple[Job, ToolUse | None]:
    """A chat request checked, admitted, resolved and rendered: the job to run and how it uses tools.

    Also the Responses API's path (server/openai/responses/), so that both generate alike. The
    job's admission is released by running the job, or here if preparing it fails.
    """
    sequences = generator.check_sequences(1, body.n)
    messages = [m.as_template_input() for m in body.messages]
    generator.check_chat_size(messages)
    extras = engine_options(body, generator.engine.vocab_size)
    tool_use = ToolUse.of(body, generator.tool_parsers())
    if tool_use is not None and not tool_use.skip_special_tokens:
        extras["skip_special_tokens"] = False  # the tool-call parser reads them in the text
    admission = generator.admit(principal, sequences)
    with admission.released_on_error():
        constraint = await request_constraint(request, body.response_format, body.structured_outputs)
        if tool_use is not None and (forced := tool_use.constraint()) is not None:
            if constraint is not None:
                raise InvalidRequest(
                    "a forced tool call already fixes the output's shape: send response_format or structured_outputs, "
                    'or tool_choice "required" / a named function, not both',
                    param="tool_choice",
                )
            await grammar_checker(request).check(forced, "tools")
            constraint = forced
        admission.entry = await generator.resolve(body.model, principal)
        try:
            prompt = await generator.render_chat(messages, tool_use.tools if tool_use else None)
        except Exception as exc:  # the template is the model's code: any failure is the input's
            raise InvalidRequest(f"the chat template rejected these messages: {exc}", param="messages") from None
        max_tokens = generator.check_fits(prompt, body.requested_max_tokens, "messages", body.min_tokens)
        options = SamplingOptions(
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            n=body.n,
            stop=body.stop_sequences,
            seed=body.seed,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            logprobs=(body.top_logprobs or 0) if body.logprobs else None,
            stream=body.stream,
            min_tokens=body.min_tokens,
            ignore_eos=body.ignore_eos,
            constraint=constraint,
            **extras,
        )
        job = Job(new_request_id(id_prefix), body.model, [prompt], options, record, admission, body.return_token_ids)
    return job, tool_use


def _message(tool_use: ToolUse | None, text: str, finish_reason: str | None) -> tuple[dict[str, Any], str | None]:
    if tool_use is None:
        return {"role": "assistant", "content": text}, finish_reason
    return tool_use.message(text, finish_reason)


async def _stream(
    generator: Generator, job: Job, include_usage: bool, top: int, tool_use: ToolUse | None
) -> AsyncIterator[list[Any]]:
    """A batch of chunks per engine step; the first also opens each choice with its role, and the
    job's last also carries the usage and DONE."""
    created = int(time.time())
    usage = Usage()

    def chunk(choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": job.request_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": job.model,
            "choices": choices,
        }

    batch: list[Any] = [
        chunk(
            [
                {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                for i in range(job.options.n)
            ]
        )
    ]
    streamers = {i: tool_use.streamer() for i in range(job.options.n)} if tool_use else {}
    async for _, step, last in generator.stream(job):
        for delta in step.choices:
            usage.completion_tokens += delta.token_count
            if tool_use is not None:
                batch += _tool_chunks(chunk, job, streamers[delta.index], delta, top)
                continue
            batch.append(
                chunk(
                    [
                        job.with_ids(
                            {
                                "index": delta.index,
                                "delta": {"content": delta.text} if delta.text else {},
                                "logprobs": _logprobs(delta.logprobs, top),
                                "finish_reason": delta.finish_reason,
                            },
                            delta.token_ids,
                        )
                    ]
                )
            )
        if step.finished:
            usage.prompt_tokens += step.prompt_tokens
        if last:
            if include_usage:
                batch.append(chunk([]) | {"usage": usage.as_dict()})
            batch.append(DONE)
        yield batch
        batch = []


def _tool_chunks(chunk: Any, job: Job, streamer: Any, delta: Any, top: int) -> list[dict[str, Any]]:
    """A step of a choice with tools: its deltas (content or tool_calls), the last with the finish reason."""
    deltas = streamer.step(delta.text, delta.token_ids)
    finish_reason = None
    if delta.finish_reason is not None:
        more, finish_reason = streamer.finish(delta.finish_reason)
        deltas = [*deltas, *more] or [{}]
    elif not deltas and (delta.logprobs or job.return_token_ids):
        deltas = [{}]  # the step's tokens still go out
    choices = [{"index": delta.index, "delta": message, "logprobs": None, "finish_reason": None} for message in deltas]
    if choices:
        job.with_ids(choices[0], delta.token_ids)
        choices[0]["logprobs"] = _logprobs(delta.logprobs, top)
        choices[-1]["finish_reason"] = finish_reason
    return [chunk([choice]) for choice in choices]


def _logprobs(entries: list[TokenLogprob] | None, top: int) -> dict[str, list[Any]] | None:
    if entries is None:
        return None

    def item(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {
        "content": [
            item(entry.token, entry.logprob)
            | {
                "top_logprobs": [
                    item(token, logprob) for token, logprob in sorted(entry.top.items(), key=lambda kv: -kv[1])[:top]
                ]
            }
            for entry in entries
        ]
    }

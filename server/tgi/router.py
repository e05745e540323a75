"""TGI's and LoRAX's generate API: POST /generate, /generate_stream and /, GET /info and /ping.

Clients written for Text Generation Inference or LoRAX (huggingface_hub's InferenceClient,
lorax-client) work unchanged. `parameters.adapter_id` names a model as `model` does on the OpenAI
routes, with the same tenancy; `merged_adapters` composes adapters per request (server/tgi/merge.py).
Every failure is TGI's `{"error", "error_type"}` (server/http/errors.py picks the shape by route).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Request, Response
from starlette.background import BackgroundTask

from adapters.errors import AdapterError
from server.engine.protocol import GenerationStep, PromptToken, SamplingOptions, TokenLogprob
from server.http.deps import PrincipalDep, RecordDep
from server.http.errors import (
    EngineUnavailable,
    GatewayError,
    InvalidRequest,
    PromptTooLong,
    UnsupportedMediaType,
    tgi_error_payload,
)
from server.http.responses import JSONResponse, SSEResponse, unless_disconnected
from server.openai.generation import ENGINE_DEAD_MESSAGE, Generator, GeneratorDep, Job, new_request_id
from server.openai.protocol import MAX_STOP
from server.openai.structured import GrammarChecker, GrammarCheckerDep
from server.tgi.merge import DEFAULT_MAX_ENTRIES, MergedAdapterCache
from server.tgi.protocol import GenerateRequest, TgiInvalid, parse_request

logger = logging.getLogger(__name__)


async def require_json(request: Request) -> None:
    """TGI's routes take JSON only, as TGI's own server does: a web page's form (urlencoded,
    multipart or text/plain) cannot post to them."""
    if request.method in ("GET", "HEAD"):
        return
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    kind, _, subtype = media_type.partition("/")
    if kind != "application" or not (subtype == "json" or subtype.endswith("+json")):
        shown = media_type[:100] or "none"
        raise UnsupportedMediaType(f"the body must be JSON with 'Content-Type: application/json', not {shown}")


router = APIRouter(dependencies=[Depends(require_json)])


async def get_merged(request: Request) -> MergedAdapterCache:
    state = request.app.state
    cache = getattr(state, "merged_adapters", None)
    if cache is None:
        bound = max(DEFAULT_MAX_ENTRIES, state.settings.max_cpu_loras)
        cache = state.merged_adapters = MergedAdapterCache(state.registry, bound)
    return cache


MergedDep = Annotated[MergedAdapterCache, Depends(get_merged)]


@dataclass
class TgiJob:
    """A validated TGI request on its way to the engine."""

    job: Job
    body: GenerateRequest
    seed: int | None
    special: frozenset[int]


@dataclass
class Generated:
    """A finished generation, gathered from its steps."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    prefill: list[PromptToken] = field(default_factory=list)


@router.post("/generate", response_model=None)
async def generate(
    request: Request,
    generator: GeneratorDep,
    principal: PrincipalDep,
    record: RecordDep,
    merged: MergedDep,
    grammars: GrammarCheckerDep,
) -> Response:
    body = _body(await request.body(), stream=False)
    tgi = await _prepare(body, generator, principal, record, merged, grammars, stream=False)
    return JSONResponse(await _complete(request, generator, tgi))


@router.post("/generate_stream", response_model=None)
async def generate_stream(
    request: Request,
    generator: GeneratorDep,
    principal: PrincipalDep,
    record: RecordDep,
    merged: MergedDep,
    grammars: GrammarCheckerDep,
) -> Response:
    body = _body(await request.body(), stream=True)
    tgi = await _prepare(body, generator, principal, record, merged, grammars, stream=True)
    return _stream_response(generator, tgi)


@router.post("/", response_model=None)
async def compat_generate(
    request: Request,
    generator: GeneratorDep,
    principal: PrincipalDep,
    record: RecordDep,
    merged: MergedDep,
    grammars: GrammarCheckerDep,
) -> Response:
    """TGI's compatibility route: a stream when `stream` is true, else a list of one generation."""
    body = parse_request(await request.body())
    stream = bool(body.stream)
    tgi = await _prepare(body, generator, principal, record, merged, grammars, stream=stream)
    if stream:
        return _stream_response(generator, tgi)
    return JSONResponse([await _complete(request, generator, tgi)])


@router.get("/info", response_model=None)
async def info(request: Request) -> JSONResponse:
    """TGI's (and LoRAX's) model info: what a client may ask of this server."""
    state = request.app.state
    context = state.engine.max_model_len
    return JSONResponse(
        {
            "model_id": state.registry.base_name,
            "model_sha": None,
            "model_pipeline_tag": "text-generation",
            "max_concurrent_requests": state.settings.max_in_flight,
            "max_best_of": 1,
            "max_stop_sequences": MAX_STOP,
            "max_input_tokens": context - 1,
            "max_input_length": context - 1,  # LoRAX's name
            "max_total_tokens": context,
            "max_batch_size": state.settings.max_num_seqs,
            "max_client_batch_size": 1,
            "max_loras": state.settings.max_loras,
            "validation_workers": 1,
            "router": "lora-gateway",
            "version": request.app.version,
            "sha": None,
            "docker_label": None,
        }
    )


@router.get("/ping", response_model=None)
async def ping(request: Request) -> Response:
    """TGI's health route: 200 while the engine can serve (GET /health here is liveness only)."""
    state = request.app.state
    if state.ready and state.engine.is_healthy:
        return Response(status_code=200)
    return JSONResponse({"error": "unhealthy", "error_type": "healthcheck"}, status_code=503)


def _body(raw: bytes, *, stream: bool) -> GenerateRequest:
    body = parse_request(raw)
    if body.stream is not None and body.stream != stream:
        route, other = ("/generate_stream", "/generate") if stream else ("/generate", "/generate_stream")
        raise TgiInvalid(f"'stream' is {str(body.stream).lower()} on {route}; use {other} or POST /", param="stream")
    return body


async def _prepare(
    body: GenerateRequest,
    generator: Generator,
    principal: Any,
    record: Any,
    merged: MergedAdapterCache,
    grammars: GrammarChecker,
    *,
    stream: bool,
) -> TgiJob:
    """Check, admit, then resolve (or compose) and tokenize: every refusal happens here, before
    anything is sent, and nothing is worked on before the caller's tenant has room for it."""
    params = body.parameters
    record.endpoint = "generate_stream" if stream else "generate"
    params.check(stream=stream)
    merge = params.merged_adapters
    recipe = merge.recipe() if merge is not None else None
    engine = generator.engine
    limit = engine.max_model_len
    if params.truncate is not None and params.truncate >= limit:
        raise TgiInvalid(
            f"`truncate` must be strictly positive and less than {limit}. Given: {params.truncate}",
            param="parameters.truncate",
        )
    try:
        generator.check_prompt_chars(len(body.inputs), "inputs")
    except PromptTooLong as exc:
        raise TgiInvalid(exc.message, param="inputs") from None
    try:
        constraint = params.grammar.constraint() if params.grammar is not None else None
    except InvalidRequest as exc:
        raise TgiInvalid(exc.message, param=exc.param) from None
    admission = generator.admit(principal)
    with admission.released_on_error():
        try:
            await grammars.check(constraint, "parameters.grammar")
        except InvalidRequest as exc:
            raise TgiInvalid(exc.message, param=exc.param) from None
        if merge is not None and recipe is not None:
            if not engine.is_healthy:
                raise EngineUnavailable(ENGINE_DEAD_MESSAGE)
            entry = await merged.get(principal, merge.ids, recipe)
            record.model = entry.name
        else:
            record.model = params.adapter_id or generator.registry.base_name
            entry = await generator.resolve(record.model, principal)
        admission.entry = entry
        (prompt_ids,) = await generator.encode([body.inputs])
        if params.truncate is not None:
            prompt_ids = prompt_ids[-params.truncate :]  # TGI keeps the end of the input
        max_tokens = _fit(prompt_ids, params.max_new_tokens, limit)
        seed = params.sampling_seed()
        sampling = params.sampling
        options = SamplingOptions(
            max_tokens=max_tokens,
            temperature=(params.temperature or 1.0) if sampling else 0.0,
            top_p=params.top_p or 1.0,
            top_k=params.top_k or 0,
            stop=tuple(params.stop),
            seed=seed,
            presence_penalty=params.presence_penalty or 0.0,
            frequency_penalty=params.frequency_penalty or 0.0,
            repetition_penalty=params.repetition_penalty or 1.0,
            logprobs=0 if stream or params.details or params.decoder_input_details else None,
            stream=stream,
            ignore_eos=params.ignore_eos_token,
            prompt_logprobs=params.decoder_input_details,
            include_stop_str=True,
            constraint=constraint,
        )
        job = Job(new_request_id("generate"), record.model, [prompt_ids], options, record, admission)
    return TgiJob(job, body, seed, engine.special_token_ids)


def _fit(prompt_ids: list[int], max_new_tokens: int | None, limit: int) -> int:
    """max_new_tokens, or all the room left (as TGI); 422 in TGI's words when the total is over."""
    if len(prompt_ids) >= limit:
        raise TgiInvalid(f"`inputs` must have less than {limit} tokens. Given: {len(prompt_ids)}", param="inputs")
    room = limit - len(prompt_ids)
    if max_new_tokens is None:
        return room
    if max_new_tokens > room:
        raise TgiInvalid(
            f"`inputs` tokens + `max_new_tokens` must be <= {limit}. Given: {len(prompt_ids)} `inputs` tokens "
            f"and {max_new_tokens} `max_new_tokens`",
            param="parameters.max_new_tokens",
        )
    return max_new_tokens


async def _complete(request: Request, generator: Generator, tgi: TgiJob) -> dict[str, Any]:
    with tgi.job.admission.released_at_end():
        generated = await unless_disconnected(request, _collect(generator, tgi.job))
    params = tgi.body.parameters
    response: dict[str, Any] = {"generated_text": _full_text(tgi.body, generated.text)}
    if params.details or params.decoder_input_details:
        engine = generator.engine
        prompt_ids = tgi.job.prompts[0]
        prefill = []
        if params.decoder_input_details:
            texts = engine.token_texts([p.token_id for p in generated.prefill])
            prefill = [
                {"id": p.token_id, "text": text, "logprob": p.logprob}
                for p, text in zip(generated.prefill, texts, strict=True)
            ]
        texts = engine.token_texts(generated.token_ids, context=prompt_ids)
        response["details"] = {
            "finish_reason": _finish_reason(generated.finish_reason, generated.token_ids, tgi.special),
            "generated_tokens": len(generated.token_ids),
            "seed": tgi.seed,
            "prefill": prefill,
            "tokens": [
                _token(token_id, text, logprob, tgi.special)
                for token_id, text, logprob in zip(generated.token_ids, texts, _logprobs(generated), strict=True)
            ],
            # LoRAX's additions, which lorax-client requires
            "prompt_tokens": generated.prompt_tokens,
            "skipped_tokens": 0,
        }
    return response


async def _collect(generator: Generator, job: Job) -> Generated:
    generated = Generated()
    async for _, step, _ in generator.stream(job):
        _gather(generated, step)
    return generated


def _gather(generated: Generated, step: GenerationStep) -> None:
    if step.prompt_logprobs:
        generated.prefill = step.prompt_logprobs
    if step.finished:
        generated.prompt_tokens = step.prompt_tokens
    for choice in step.choices:
        generated.text += choice.text
        generated.token_ids += choice.token_ids
        generated.logprobs += choice.logprobs or []
        if choice.finish_reason is not None:
            generated.finish_reason = choice.finish_reason


def _logprobs(generated: Generated) -> list[float | None]:
    values: list[float | None] = [entry.logprob for entry in generated.logprobs]
    return values + [None] * (len(generated.token_ids) - len(values))


def _token(token_id: int, text: str, logprob: float | None, special: frozenset[int]) -> dict[str, Any]:
    return {"id": token_id, "text": text, "logprob": logprob, "special": token_id in special, "skipped": False}


def _finish_reason(reason: str | None, token_ids: list[int], special: frozenset[int]) -> str:
    """TGI's names: vLLM's 'stop' is the end-of-sequence token, or else a stop sequence."""
    if reason == "length":
        return "length"
    if token_ids and token_ids[-1] in special:
        return "eos_token"
    return "stop_sequence"


def _full_text(body: GenerateRequest, text: str) -> str:
    return body.inputs + text if body.parameters.return_full_text else text


def _stream_response(generator: Generator, tgi: TgiJob) -> Response:
    """TGI's server-sent events: one per token; the last carries generated_text (and details).

    No `[DONE]` follows, as TGI sends none (lorax-client would fail to parse one).
    """
    release = tgi.job.admission.release

    async def run_release() -> None:
        release()  # also when the client left before the stream began

    return SSEResponse(
        _events(generator, tgi),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        background=BackgroundTask(run_release),
    )


async def _events(generator: Generator, tgi: TgiJob) -> AsyncIterator[bytes]:
    params = tgi.body.parameters
    engine = generator.engine
    generated = Generated()
    pending: dict[str, Any] | None = None  # the latest token's event, held until we know whether it is the last
    count = 0
    try:
        async for _, step, last in generator.stream(tgi.job):
            context = tgi.job.prompts[0] + generated.token_ids
            _gather(generated, step)
            events: list[dict[str, Any]] = []
            for choice in step.choices:
                texts = _stream_texts(engine, choice.token_ids, choice.text, context, tgi.special)
                logprobs = [entry.logprob for entry in choice.logprobs or []]
                logprobs += [None] * (len(choice.token_ids) - len(logprobs))
                for token_id, text, logprob in zip(choice.token_ids, texts, logprobs, strict=True):
                    if pending is not None:
                        events.append(pending)
                    count += 1
                    token = _token(token_id, text, logprob, tgi.special)
                    pending = {"index": count, "token": token, "generated_text": None, "details": None}
            if last and pending is not None:
                pending["generated_text"] = _full_text(tgi.body, generated.text)
                if params.details:
                    pending["details"] = {
                        "finish_reason": _finish_reason(generated.finish_reason, generated.token_ids, tgi.special),
                        "generated_tokens": len(generated.token_ids),
                        "seed": tgi.seed,
                        "input_length": generated.prompt_tokens,
                        "prompt_tokens": generated.prompt_tokens,  # LoRAX's name
                    }
                events.append(pending)
                pending = None
            if events:
                yield b"".join(b"data: " + orjson.dumps(event) + b"\n\n" for event in events)
    except (GatewayError, AdapterError) as exc:
        yield b"data: " + orjson.dumps(tgi_error_payload(exc)) + b"\n\n"
    except Exception:
        logger.exception("stream failed")
        yield b"data: " + orjson.dumps({"error": "the generation failed", "error_type": "generation"}) + b"\n\n"


def _stream_texts(
    engine: Any, token_ids: list[int], delta: str, context: list[int], special: frozenset[int]
) -> list[str]:
    """Each new token's text such that the plain tokens' texts add up to the engine's text delta."""
    texts = engine.token_texts(token_ids, context=context)
    plain = [i for i, token_id in enumerate(token_ids) if token_id not in special]
    if not plain:
        return texts
    joined = "".join(texts[i] for i in plain[:-1])
    if delta.startswith(joined):
        texts[plain[-1]] = delta[len(joined) :]
    else:
        for i in plain[:-1]:
            texts[i] = ""
        texts[plain[-1]] = delta
    return texts

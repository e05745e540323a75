"""POST /tokenize and POST /detokenize, in vLLM's shapes, per model.

The model resolves as for generation (an adapter name, with tenancy; absent: the base model),
though every adapter shares the base model's tokenizer. Each request is admitted like a
generation of one sequence, and its input is bounded before the tokenizer sees it.
"""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Request
from pydantic import Field

from server.http.deps import PrincipalDep, RecordDep
from server.http.errors import ContextLengthExceeded, InvalidRequest
from server.http.responses import JSONResponse
from server.openai.generation import GeneratorDep
from server.openai.protocol import ChatMessage, ModelName, _Request

router = APIRouter()


class TokenizeCompletion(_Request):
    """vLLM's TokenizeCompletionRequest."""

    model: ModelName | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChat(_Request):
    """vLLM's TokenizeChatRequest, with the template as it renders for generation."""

    model: ModelName | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    return_token_strs: bool = False


class Detokenize(_Request):
    """vLLM's DetokenizeRequest."""

    model: ModelName | None = None
    tokens: list[int]


@router.post("/tokenize", response_model=None)
async def tokenize(
    request: Request, generator: GeneratorDep, principal: PrincipalDep, record: RecordDep
) -> JSONResponse:
    try:
        data = orjson.loads(await request.body())
    except orjson.JSONDecodeError:
        raise InvalidRequest("request body is not valid JSON") from None
    body: TokenizeCompletion | TokenizeChat
    if isinstance(data, dict) and "messages" in data:
        body = TokenizeChat.model_validate(data)
        _only_as_generation_renders(body)
        messages = [m.as_template_input() for m in body.messages]
        generator.check_chat_size(messages)
        chars = sum(len(message["content"]) for message in messages)
    else:
        body = TokenizeCompletion.model_validate(data)
        generator.check_prompt_chars(len(body.prompt), "prompt")
        chars = len(body.prompt)
    model = body.model or generator.registry.base_name
    record.endpoint, record.model = "tokenize", model
    admission = generator.admit(principal)
    with admission.released_at_end():
        await generator.resolve(model, principal)
        engine = generator.engine
        if isinstance(body, TokenizeChat):
            tokens = await generator.render_chat(messages)
        else:
            prompt, special = body.prompt, body.add_special_tokens
            tokens = await generator.tokenizing(lambda: engine.encode(prompt, add_special_tokens=special), chars)
        pieces = engine.token_pieces(tokens) if body.return_token_strs else None
    answer: dict[str, Any] = {
        "count": len(tokens),
        "max_model_len": engine.max_model_len,
        "tokens": tokens,
        "token_strs": pieces,
    }
    return JSONResponse(answer)


@router.post("/detokenize", response_model=None)
async def detokenize(
    body: Detokenize, generator: GeneratorDep, principal: PrincipalDep, record: RecordDep
) -> JSONResponse:
    model = body.model or generator.registry.base_name
    record.endpoint, record.model = "detokenize", model
    limit = generator.engine.max_model_len
    if len(body.tokens) > limit:
        raise ContextLengthExceeded(
            f"{len(body.tokens)} tokens are more than this model's context of {limit}; send at most {limit}",
            param="tokens",
        )
    admission = generator.admit(principal)
    with admission.released_at_end():
        await generator.resolve(model, principal)
        _check_vocabulary(body.tokens, generator.engine.vocab_size)
        (text,) = await generator.decode([body.tokens])
    return JSONResponse({"prompt": text})


def _only_as_generation_renders(body: TokenizeChat) -> None:
    """The chat tokens are the ones a chat completion would run on; other renderings are refused."""
    if not body.add_generation_prompt or body.continue_final_message or body.add_special_tokens:
        raise InvalidRequest(
            "this server tokenizes chats as chat completions render them: add_generation_prompt true, "
            "continue_final_message and add_special_tokens false; leave those fields out",
            param="add_generation_prompt" if not body.add_generation_prompt else "continue_final_message",
        )


def _check_vocabulary(tokens: list[int], vocab_size: int) -> None:
    bad = next((token for token in tokens if not 0 <= token < vocab_size), None)
    if bad is not None:
        raise InvalidRequest(
            f"token id {bad} is not in this model's vocabulary (0 to {vocab_size - 1})", param="tokens"
        )

"""The Batch API's shapes: the create request, the Batch object, and the input file's lines.

An input file (purpose=batch) is checked at upload, line by line, holding one line at a time: each
line is `{"custom_id", "method": "POST", "url", "body"}`, every `custom_id` unique, one `url` for
the whole file (an endpoint this gateway runs in batches), and a `body` that the endpoint's own
request model accepts, not streamed. Every problem names its line.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from server.http.bodies import Metadata
from server.http.errors import GatewayError, InvalidRequest, _validation_error, as_gateway_error
from server.openai import chat, completions
from server.openai.protocol import ChatCompletionRequest, CompletionRequest
from server.openai.responses import router as responses
from server.openai.responses.protocol import ResponsesRequest

BATCH, BATCH_OUTPUT = "batch", "batch_output"
COMPLETION_WINDOW = "24h"
WINDOW_SECONDS = 24 * 3600
MAX_CUSTOM_ID = 512
NOT_SERVED = ("/v1/embeddings", "/v1/moderations")


@dataclass(frozen=True)
class BatchEndpoint:
    """An endpoint a batch can run: its request model and the function its route calls."""

    path: str
    request_model: type[BaseModel]
    handler: Callable[..., Any]

    def sequences(self, body: BaseModel) -> int:
        """The sequences (prompts × n) a line asks for, as the route counts them."""
        prompts = len(body.prompts()) if isinstance(body, CompletionRequest) else 1
        return prompts * body.n  # type: ignore[attr-defined]


ENDPOINTS = {
    "/v1/chat/completions": BatchEndpoint("/v1/chat/completions", ChatCompletionRequest, chat.create_chat_completion),
    "/v1/completions": BatchEndpoint("/v1/completions", CompletionRequest, completions.create_completion),
    # Lines are not stored (store false), as OpenAI's batches do not store their responses.
    "/v1/responses": BatchEndpoint("/v1/responses", ResponsesRequest, responses.create_response_in_batch),
}


def endpoint_problem(url: object) -> str | None:
    """What is wrong with `url` as a batch's endpoint; None when batches can run it."""
    if url in ENDPOINTS:
        return None
    served = " or ".join(ENDPOINTS)
    if url in NOT_SERVED:
        return f"{url} is not served by this gateway; batches run {served}"
    return f"'{str(url)[:64]}' is not an endpoint batches run; use {served}"


class InvalidBatchFile(GatewayError):
    status_code = 400
    error_type = "invalid_request_error"
    code = "invalid_batch_file"


class CreateBatch(BaseModel):
    """POST /v1/batches."""

    model_config = ConfigDict(extra="forbid")

    input_file_id: Annotated[str, Field(min_length=1, max_length=128)]
    endpoint: str
    completion_window: str
    metadata: Metadata = None

    @field_validator("endpoint")
    @classmethod
    def _endpoint_served(cls, endpoint: str) -> str:
        if (problem := endpoint_problem(endpoint)) is not None:
            raise InvalidRequest(problem, param="endpoint")
        return endpoint

    @field_validator("completion_window")
    @classmethod
    def _window(cls, window: str) -> str:
        if window != COMPLETION_WINDOW:
            raise InvalidRequest(
                f"completion_window '{window[:16]}' is not offered; use '{COMPLETION_WINDOW}'",
                param="completion_window",
            )
        return window


def batch_card(row) -> dict[str, Any]:
    """OpenAI's Batch object from a catalog row (adapters/batches_db.py's BatchRow)."""
    card: dict[str, Any] = {
        "id": row.id,
        "object": "batch",
        "endpoint": row.endpoint,
        "errors": None if not row.errors else {"object": "list", "data": row.errors},
        "input_file_id": row.input_file_id,
        "completion_window": row.completion_window,
        "status": row.status,
        "output_file_id": row.output_file_id,
        "error_file_id": row.error_file_id,
        "created_at": int(row.created_at),
        "expires_at": int(row.expires_at),
        "request_counts": {"total": row.total, "completed": row.completed, "failed": row.failed},
        "metadata": row.metadata,
    }
    for name in (
        "in_progress_at",
        "finalizing_at",
        "completed_at",
        "failed_at",
        "expired_at",
        "cancelling_at",
        "cancelled_at",
    ):
        card[name] = int(row.times[name]) if name in row.times else None
    return card


@dataclass(frozen=True)
class BatchLine:
    number: int  # 1-based
    custom_id: str
    url: str
    body: dict[str, Any]


def read_lines(stream: Iterable[bytes], max_lines: int, max_line_bytes: int) -> Iterator[BatchLine]:
    """The input file's lines, each checked; InvalidBatchFile names the first bad one.

    Reads one line at a time (a line longer than `max_line_bytes` is refused as soon as it is),
    and keeps only the custom_ids seen: memory is bounded by the line cap, not the file.
    """
    seen: set[str] = set()
    url = None
    count = 0
    for number, raw in enumerate(_bounded_lines(stream, max_line_bytes), start=1):
        if not raw.strip():
            continue
        count += 1
        if count > max_lines:
            raise InvalidBatchFile(
                f"line {number}: a batch file may have at most {max_lines} lines (--batch-max-lines)"
            )
        line = _parse(number, raw, url)
        url = line["url"]
        if line["custom_id"] in seen:
            raise InvalidBatchFile(f"line {number}: custom_id '{line['custom_id'][:64]}' is used by an earlier line")
        seen.add(line["custom_id"])
        yield BatchLine(number, line["custom_id"], line["url"], line["body"])
    if count == 0:
        raise InvalidBatchFile("the batch file is empty; send one JSON request per line")


def _bounded_lines(stream: Iterable[bytes], max_line_bytes: int) -> Iterator[bytes]:
    readline = getattr(stream, "readline", None)
    if readline is None:
        yield from stream
        return
    number = 0
    while raw := readline(max_line_bytes + 1):
        number += 1
        if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
            raise InvalidBatchFile(f"line {number}: longer than {max_line_bytes} bytes (--max-body-bytes)")
        yield raw


def _parse(number: int, raw: bytes, url: str | None) -> dict[str, Any]:
    """One line, checked; `url` is the earlier lines' endpoint (None on the first line)."""
    where = f"line {number}"
    try:
        line = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise InvalidBatchFile(f"{where}: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise InvalidBatchFile(f"{where}: not valid JSON ({exc.msg})") from None
    if not isinstance(line, dict):
        raise InvalidBatchFile(f"{where}: expected a JSON object with custom_id, method, url and body")
    extra = set(line) - {"custom_id", "method", "url", "body"}
    if extra:
        raise InvalidBatchFile(
            f"{where}: unknown field '{sorted(extra)[0][:64]}'; a line has custom_id, method, url, body"
        )
    custom_id = line.get("custom_id")
    if not isinstance(custom_id, str) or not 1 <= len(custom_id) <= MAX_CUSTOM_ID:
        raise InvalidBatchFile(f"{where}: custom_id must be a string of 1 to {MAX_CUSTOM_ID} characters")
    if line.get("method") != "POST":
        raise InvalidBatchFile(f"{where}: method must be POST")
    if (problem := endpoint_problem(line.get("url"))) is not None:
        raise InvalidBatchFile(f"{where}: url {problem}")
    if url is not None and line["url"] != url:
        raise InvalidBatchFile(
            f"{where}: url is {line['url']}, but earlier lines use {url}; one file runs one endpoint"
        )
    body = line.get("body")
    if not isinstance(body, dict):
        raise InvalidBatchFile(f"{where}: body must be a JSON object, the request {line['url']} takes")
    if body.get("stream"):
        raise InvalidBatchFile(f"{where}: body: stream is not allowed in a batch; leave it out")
    if (problem := body_problem(line["url"], body)) is not None:
        raise InvalidBatchFile(f"{where}: body: {problem}")
    return line


def parse_body(url: str, body: dict[str, Any]) -> BaseModel:
    """The endpoint's request model for `body`; raises its own validation errors."""
    return ENDPOINTS[url].request_model.model_validate(body)


def body_problem(url: str, body: dict[str, Any]) -> str | None:
    try:
        parse_body(url, body)
    except ValidationError as exc:
        return _validation_error(exc).message
    except GatewayError as exc:
        return as_gateway_error(exc).message
    return None


def summarize_batch_file(raw: bytes, max_lines: int, max_line_bytes: int) -> dict[str, Any]:
    """Check an uploaded batch file (see read_lines); what the file's row keeps about it."""
    endpoint, lines = None, 0
    for line in read_lines(io.BytesIO(raw), max_lines, max_line_bytes):
        lines += 1
        endpoint = line.url
    return {"endpoint": endpoint, "lines": lines}

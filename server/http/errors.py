"""Typed errors, the map from the adapter layer's errors to HTTP, and the one function that
renders them all in OpenAI's error shape."""

from __future__ import annotations

import logging
import math

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import Scope

from adapters import errors as adapter_errors

logger = logging.getLogger(__name__)


class GatewayError(Exception):
    """Base of every error the gateway answers with; rendered by `error_response`."""

    status_code = 500
    error_type = "server_error"
    code = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers or {}


class InvalidRequest(GatewayError):
    """The request is well-formed JSON but asks for something invalid."""

    status_code = 400
    error_type = "invalid_request_error"
    code = "invalid_value"


class UnsupportedParameter(InvalidRequest):
    """An OpenAI parameter this gateway does not implement; never dropped silently."""

    code = "unsupported_parameter"

    def __init__(self, param: str):
        super().__init__(f"parameter '{param}' is not supported by this server", param=param)


class ContextLengthExceeded(InvalidRequest):
    """The prompt plus max_tokens cannot fit the model's context window."""

    code = "context_length_exceeded"


class TooManySequences(InvalidRequest):
    """A request asks for more sequences (prompts × n) than one request, or its tenant, may ever run."""

    code = "too_many_sequences"


class PromptTooLong(ContextLengthExceeded):
    """A prompt over --max-prompt-chars, refused before it is tokenized."""

    def __init__(self, chars: int, limit: int, param: str):
        super().__init__(
            f"the prompt is {chars} characters; this server reads at most {limit} (--max-prompt-chars); shorten it",
            param=param,
        )


class UnsupportedMediaType(GatewayError):
    """A body in a format the route does not take (the TGI routes take JSON only)."""

    status_code = 415
    error_type = "invalid_request_error"
    code = "unsupported_media_type"


class ModelNotFound(GatewayError):
    """Unknown model, or one the caller may not use: the two must look the same."""

    status_code = 404
    error_type = "invalid_request_error"
    code = "model_not_found"

    def __init__(self, name: str):
        super().__init__(adapter_errors.AdapterNotFound(name).message, param="model")


class EngineUnavailable(GatewayError):
    """The engine is dead, starting, or draining."""

    status_code = 503
    error_type = "service_unavailable_error"
    code = "engine_unavailable"


class Overloaded(EngineUnavailable):
    """The gateway is at its bound of requests in flight."""

    code = "overloaded"


class ClientClosed(GatewayError):
    """The client went away before the answer was ready (logged as nginx's 499)."""

    status_code = 499
    error_type = "invalid_request_error"
    code = "client_closed_request"


# The adapter layer's errors as (status, OpenAI type, code); a subclass not listed takes its base's.
_ADAPTER_ERRORS: dict[type[adapter_errors.AdapterError], tuple[int, str, str]] = {
    adapter_errors.AdapterError: (400, "invalid_request_error", "invalid_value"),
    adapter_errors.AdapterNotFound: (404, "invalid_request_error", "model_not_found"),
    adapter_errors.InvalidAdapterName: (400, "invalid_request_error", "invalid_value"),
    adapter_errors.InvalidAdapter: (400, "invalid_request_error", "invalid_adapter"),
    adapter_errors.AdapterTooLarge: (413, "invalid_request_error", "adapter_too_large"),
    adapter_errors.InvalidComposition: (400, "invalid_request_error", "invalid_composition"),
    adapter_errors.MergeFailed: (400, "invalid_request_error", "merge_failed"),
    adapter_errors.QuotaExceeded: (429, "rate_limit_error", "quota_exceeded"),
    adapter_errors.StorageQuotaExceeded: (413, "invalid_request_error", "file_too_large"),
    adapter_errors.OwnerNotFound: (404, "invalid_request_error", "tenant_not_found"),
    adapter_errors.JobGone: (404, "invalid_request_error", "fine_tuning_job_not_found"),
    adapter_errors.InvalidTrainingFile: (400, "invalid_request_error", "invalid_training_file"),
    adapter_errors.InvalidTrainingSettings: (400, "invalid_request_error", "invalid_value"),
    adapter_errors.CatalogUnavailable: (503, "service_unavailable_error", "catalog_unavailable"),
    adapter_errors.StoreUnavailable: (503, "service_unavailable_error", "store_unavailable"),
    adapter_errors.ConverterBusy: (503, "service_unavailable_error", "converter_busy"),
}


def from_adapter_error(exc: adapter_errors.AdapterError) -> GatewayError:
    """The gateway error, with its status and code, that answers one of the adapter layer's errors."""
    kind = next(k for k in type(exc).__mro__ if k in _ADAPTER_ERRORS)
    status, error_type, code = _ADAPTER_ERRORS[kind]
    headers = {}
    if isinstance(exc, adapter_errors.Unavailable | adapter_errors.QuotaExceeded) and status in (429, 503):
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    error = GatewayError(exc.message, param=exc.param, headers=headers)
    error.status_code, error.error_type, error.code = status, error_type, code
    return error


def as_gateway_error(exc: GatewayError | adapter_errors.AdapterError) -> GatewayError:
    return from_adapter_error(exc) if isinstance(exc, adapter_errors.AdapterError) else exc


def http_status(exc: GatewayError | adapter_errors.AdapterError) -> int:
    return as_gateway_error(exc).status_code


def error_body(message: str, error_type: str, code: str, param: str | None = None) -> dict[str, dict[str, str | None]]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_payload(exc: GatewayError | adapter_errors.AdapterError) -> dict[str, dict[str, str | None]]:
    exc = as_gateway_error(exc)
    return error_body(exc.message, exc.error_type, exc.code, exc.param)


def error_response(exc: GatewayError | adapter_errors.AdapterError, scope: Scope | None = None) -> Response:
    """The error in OpenAI's shape, or in TGI's on the TGI routes (`scope` says which route)."""
    exc = as_gateway_error(exc)
    payload = tgi_error_payload(exc) if scope is not None and speaks_tgi(scope) else error_payload(exc)
    return Response(
        orjson.dumps(payload), status_code=exc.status_code, media_type="application/json", headers=exc.headers
    )


# The paths of TGI's and LoRAX's API (server/tgi/router.py), whose clients read {"error", "error_type"};
# "/" only for POST, since GET / is the console's.
TGI_PATHS = frozenset({"/generate", "/generate_stream", "/info", "/ping"})


def speaks_tgi(scope: Scope) -> bool:
    path = scope.get("path")
    return path in TGI_PATHS or (path == "/" and scope.get("method") == "POST")


def tgi_error_type(exc: GatewayError) -> str:
    """TGI's error_type, by which huggingface_hub and lorax-client pick the exception they raise."""
    if exc.status_code in (400, 413, 415, 422):
        return "validation"
    if exc.status_code == 429 or exc.code in ("overloaded", "draining"):
        return "overloaded"
    if exc.code == "engine_unavailable":
        return "generation"
    return {401: "authentication", 403: "permission", 404: "not_found"}.get(exc.status_code, "unavailable")


def tgi_error_payload(exc: GatewayError | adapter_errors.AdapterError) -> dict[str, str]:
    exc = as_gateway_error(exc)
    return {"error": exc.message, "error_type": tgi_error_type(exc)}


def _validation_error(exc: RequestValidationError | ValidationError) -> InvalidRequest:
    first = exc.errors()[0] if exc.errors() else {}
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(location) or None
    kind = first.get("type", "")
    if kind == "json_invalid":
        return InvalidRequest("request body is not valid JSON", param=None)
    if kind == "missing":
        return InvalidRequest(f"'{param}' is required", param=param)
    if kind == "extra_forbidden" and param:
        return UnsupportedParameter(param)
    detail = first.get("msg", "invalid value").removeprefix("Value error, ")  # pydantic prefixes our own
    return InvalidRequest(f"invalid value for '{param}': {detail}" if param else detail, param=param)


_HTTP_CODES = {
    400: ("invalid_request_error", "bad_request"),
    401: ("authentication_error", "invalid_api_key"),
    403: ("permission_error", "forbidden"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
    415: ("invalid_request_error", "unsupported_media_type"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
}


def install_error_handlers(app: FastAPI) -> None:
    """Render every failure, ours or the framework's, in OpenAI's error shape."""

    @app.exception_handler(GatewayError)
    @app.exception_handler(adapter_errors.AdapterError)
    async def _gateway_error(request: Request, exc: GatewayError | adapter_errors.AdapterError) -> Response:
        return error_response(exc, request.scope)

    @app.exception_handler(RequestValidationError)
    @app.exception_handler(ValidationError)
    async def _invalid(request: Request, exc: RequestValidationError | ValidationError) -> Response:
        return error_response(_validation_error(exc), request.scope)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        error_type, code = _HTTP_CODES.get(exc.status_code, ("server_error", "http_error"))
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404 and message == "Not Found":
            message = "no such route"
        if speaks_tgi(request.scope):
            error = GatewayError(message)
            error.status_code, error.code = exc.status_code, code
            return error_response(error, request.scope)
        return Response(
            orjson.dumps(error_body(message, error_type, code)),
            status_code=exc.status_code,
            media_type="application/json",
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        if speaks_tgi(request.scope):
            return error_response(GatewayError("internal server error"), request.scope)
        return Response(
            orjson.dumps(error_body("internal server error", "server_error", "internal_error")),
            status_code=500,
            media_type="application/json",
        )

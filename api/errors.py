"""The facade's error shape (SPEC §2.5) and the handlers that guarantee it."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("dreamflow.api")

INVALID_KEY = "Invalid Api Key"
NOT_FOUND = "Model id not found"


class ApiError(Exception):
    """An error the client is told about, in the vendor's shape."""

    def __init__(self, status_code: int, message: str, errors: dict[str, list[str]] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.errors = errors
        self.headers = headers


def error_response(status_code: int, message: str, errors: dict[str, list[str]] | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body: dict[str, object] = {"status": "error", "messege": message, "message": message}
    if errors:
        body["errors"] = errors
    return JSONResponse(body, status_code=status_code, headers=headers)


def field_errors(exc: ValidationError | RequestValidationError) -> dict[str, list[str]]:
    """pydantic errors as ``{"field": ["reason", ...]}``."""
    errors: dict[str, list[str]] = {}
    for item in exc.errors():
        loc = [str(part) for part in item.get("loc", ()) if part not in ("body", "query", "path")]
        errors.setdefault(".".join(loc) or "body", []).append(str(item.get("msg", "invalid")))
    return errors


def invalid_input(exc: ValidationError | RequestValidationError) -> ApiError:
    errors = field_errors(exc)
    summary = "; ".join(f"{field}: {', '.join(reasons)}" for field, reasons in errors.items())
    return ApiError(400, f"invalid request: {summary}", errors)


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status_code, exc.message, exc.errors, exc.headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    err = invalid_input(exc)
    return error_response(err.status_code, err.message, err.errors)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    message = {404: "not found", 405: "method not allowed"}.get(exc.status_code, str(exc.detail))
    errors = {"body": [message]} if exc.status_code == 400 else None  # a form the parser refused
    return error_response(exc.status_code, message, errors, getattr(exc, "headers", None))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s", request.url.path)
    return error_response(500, "internal error; the request was not processed")


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves the facade in the vendor's shape, never as a stack trace."""
    app.add_exception_handler(ApiError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected)

"""OpenAI-shaped error objects, and handlers that give every failure that shape."""

from __future__ import annotations

import logging
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

logger = logging.getLogger(__name__)

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


def error_type(status_code: int) -> str:
    if status_code in _TYPE_BY_STATUS:
        return _TYPE_BY_STATUS[status_code]
    return "server_error" if status_code >= 500 else "invalid_request_error"


class OpenAIError(Exception):
    """A failure to report to the client as ``{"error": {...}}`` with an HTTP status."""

    def __init__(
        self,
        status_code: int,
        message: str,
        code: Optional[str] = None,
        param: Optional[str] = None,
        type: Optional[str] = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.code = code
        self.param = param
        self.type = type or error_type(status_code)

    def to_dict(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def to_response(self) -> JSONResponse:
        return JSONResponse(self.to_dict(), status_code=self.status_code)


def bad_request(message: str, param: Optional[str] = None) -> OpenAIError:
    return OpenAIError(400, message, param=param)


def _validation_message(errors: list) -> tuple[str, Optional[str]]:
    parts = []
    param = None
    for err in errors:
        if err.get("type") == "json_invalid":
            detail = err.get("ctx", {}).get("error", "cannot be decoded")
            return f"malformed JSON body: {detail}", None
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        where = ".".join(loc)
        if param is None and where:
            param = where
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        parts.append(f"{where}: {msg}" if where else msg)  # a whole-body check names its fields itself
    return "; ".join(parts) or "invalid request", param


async def _on_openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
    return exc.to_response()


async def _on_validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    # FastAPI answers 422 by default (malformed JSON included); OpenAI clients expect 400.
    message, param = _validation_message(exc.errors())
    return bad_request(message, param).to_response()


async def _on_http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    return OpenAIError(exc.status_code, str(exc.detail)).to_response()


async def _on_unhandled(_: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error while serving a request", exc_info=exc)
    return OpenAIError(500, f"internal server error: {type(exc).__name__}", code="internal_error").to_response()


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(OpenAIError, _on_openai_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unhandled)

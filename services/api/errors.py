"""Errors as values with a code and a message a user can act on."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

from services.common.contract import ErrorCode


class ApiError(Exception):
    """A failure answered with an HTTP status and a JSON body
    ``{"error": code, "message": message, ...}``."""

    def __init__(
        self, status: int, code: str, message: str, *, detail: Any = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.detail = detail
        self.headers = headers or {}

    @classmethod
    def of(cls, code: ErrorCode, message: str, **kwargs: Any) -> ApiError:
        """The error for one of the contract's codes, with that code's HTTP status."""
        return cls(code.http_status, code, message, **kwargs)

    def to_response(self) -> JSONResponse:
        """The JSON response for this error."""
        body: dict[str, Any] = {"error": self.code, "message": self.message}
        if self.detail is not None:
            body["detail"] = self.detail
        return JSONResponse(body, status_code=self.status, headers=self.headers)

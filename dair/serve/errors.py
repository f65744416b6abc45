"""Errors of the HTTP API in OpenAI's shape, and the bus's error codes mapped to HTTP statuses."""
from __future__ import annotations

from typing import Any

from dair.bus import protocol as P

# A request the cluster cannot take now gets a status a client retries, with Retry-After (s).
BUS_STATUS: dict[str, tuple[int, str, int | None]] = {
    P.E_BUSY: (429, "rate_limit_exceeded", 1),
    P.E_NOT_READY: (503, "pipeline_not_ready", 2),
    P.E_BUS_RESTARTED: (503, "bus_restarted", 2),
    P.E_DISCONNECTED: (503, "bus_unreachable", 2),
    P.E_CONTEXT: (400, "context_length_exceeded", None),
    P.E_BAD_FIELD: (400, "invalid_request_error", None),
    P.E_FORBIDDEN: (403, "forbidden", None),
}


class APIError(Exception):
    """An error answer: HTTP status, message, the offending parameter, OpenAI `type`/`code`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error", retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_
        self.retry_after = retry_after

    def openai_body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}


def unsupported(param: str, why: str = "") -> APIError:
    return APIError(400, f"Unsupported parameter: '{param}'" + (f": {why}" if why else " is not supported by dair"),
                    param=param, code="unsupported_parameter")


def from_bus(code: str, message: str) -> APIError:
    """An APIError for a bus error reply (BusError.code / message)."""
    status, kind, retry = BUS_STATUS.get(code, (502, "bus_error", None))
    return APIError(status, message, code=code,
                    type_="server_error" if status >= 500 else "invalid_request_error", retry_after=retry)


def unreachable(message: str) -> APIError:
    return APIError(503, message, code="bus_unreachable", type_="server_error", retry_after=2)

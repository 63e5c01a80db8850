"""Exceptions raised by the SDK.

Every answer of the API that is not 2xx carries ``{"error": {"code", "message"}}``
(docs/api.md, "Errors"); the SDK raises the subclass of :class:`HyperfleetError`
named after its ``code``, with the code, the HTTP status and the message kept.
Branch on the class (or on ``.code``), never on the message.

Failures that are not answers of the API (the daemon cannot be reached, the
connection broke, the client's own deadline passed) raise :class:`TransportError`,
whose ``code`` and ``status`` are ``None``.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Optional, Type

__all__ = [
    "HyperfleetError",
    "TransportError",
    "CommandFailed",
    "ImageFailed",
    "Unauthorized",
    "Forbidden",
    "QuotaExceeded",
    "NotFound",
    "MethodNotAllowed",
    "BadRequest",
    "ValidationError",
    "PayloadTooLarge",
    "RangeNotSatisfiable",
    "InvalidState",
    "Conflict",
    "InsufficientCapacity",
    "Timeout",
    "MachineFailed",
    "AgentError",
    "BadGateway",
    "TooManyRequests",
    "Unavailable",
    "InsufficientStorage",
    "InternalError",
    "ERROR_CLASSES",
]


_UNSET: Any = object()


class HyperfleetError(Exception):
    """Base class of every error the SDK raises.

    Attributes:
        message: the server's sentence for people (do not parse it).
        code: the API's machine-readable error code (``"NOT_FOUND"``, ...),
            or ``None`` when the failure is not an API answer.
        status: the HTTP status, or ``None`` when there was no answer.
    """

    #: The error code this class stands for (``None`` on the base class).
    CODE: Optional[str] = None

    def __init__(self, message: str, *, code: Any = _UNSET, status: Optional[int] = None) -> None:
        super().__init__(message)
        self.message = message
        # The class's code unless told otherwise (an answer without a code
        # the SDK knows keeps what it carried, possibly None).
        self.code: Optional[str] = self.CODE if code is _UNSET else code
        self.status = status

    def __str__(self) -> str:
        if self.code is None and self.status is None:
            return self.message
        return f"{self.message} ({self.code or 'no code'}, HTTP {self.status})"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(message={self.message!r}, code={self.code!r}, "
            f"status={self.status!r})"
        )


class TransportError(HyperfleetError):
    """The daemon could not be reached, the connection broke, or the client's
    own HTTP deadline passed. The underlying ``httpx`` error is the ``__cause__``."""


class CommandFailed(HyperfleetError):
    """Raised by :meth:`ExecResult.check` when a command did not exit with 0.

    Attributes:
        result: the :class:`~hyperfleet.ExecResult` of the command.
    """

    def __init__(self, message: str, result: object) -> None:
        super().__init__(message)
        self.result = result


class ImageFailed(HyperfleetError):
    """Raised by ``Image.wait_ready`` when the pull or import ended ``failed``.

    Attributes:
        image: the failed image (its ``error`` says why).
    """

    def __init__(self, message: str, image: object) -> None:
        super().__init__(message)
        self.image = image


class Unauthorized(HyperfleetError):
    """401: no usable API key (missing, malformed, unknown, revoked or expired)."""

    CODE = "UNAUTHORIZED"


class Forbidden(HyperfleetError):
    """403: the key lacks the scope the request needs."""

    CODE = "FORBIDDEN"


class QuotaExceeded(HyperfleetError):
    """403: the tenant's quota does not allow the new machine."""

    CODE = "QUOTA_EXCEEDED"


class NotFound(HyperfleetError):
    """404: no such machine (for this tenant), key, file in the guest, or route."""

    CODE = "NOT_FOUND"


class MethodNotAllowed(HyperfleetError):
    """405: wrong method for the path."""

    CODE = "METHOD_NOT_ALLOWED"


class BadRequest(HyperfleetError):
    """400: malformed request, or a refusal by the guest (permission, is a directory...)."""

    CODE = "BAD_REQUEST"


class ValidationError(HyperfleetError):
    """400: wrong types, unknown fields, values out of bounds, bad query parameters."""

    CODE = "VALIDATION_ERROR"


class PayloadTooLarge(HyperfleetError):
    """413: the body is too large, or a file is too large for the JSON form."""

    CODE = "PAYLOAD_TOO_LARGE"


class RangeNotSatisfiable(BadRequest):
    """416 (code ``BAD_REQUEST``): a byte range outside the file."""


class InvalidState(HyperfleetError):
    """409: the machine's state does not allow the request now (the message says
    which state and what is allowed), or a ``wait`` cannot be satisfied."""

    CODE = "INVALID_STATE"


class Conflict(HyperfleetError):
    """409: the name is already used by this tenant; revoking the last admin key."""

    CODE = "CONFLICT"


class InsufficientCapacity(HyperfleetError):
    """409: the host cannot promise the guest's memory now; retry once other
    machines stopped or suspended."""

    CODE = "INSUFFICIENT_CAPACITY"


class Timeout(HyperfleetError):
    """504: the server's deadline passed before the machine got there (the work goes on)."""

    CODE = "TIMEOUT"


class MachineFailed(HyperfleetError):
    """500 ``RUNTIME_ERROR``: the machine failed while the request waited for it."""

    CODE = "RUNTIME_ERROR"


class AgentError(HyperfleetError):
    """502: the guest agent could not be reached or broke off."""

    CODE = "AGENT_ERROR"


class BadGateway(HyperfleetError):
    """502: an upstream (VMM, guest) answered badly."""

    CODE = "BAD_GATEWAY"


class TooManyRequests(HyperfleetError):
    """429: too many guest requests at once for the tenant or the server."""

    CODE = "TOO_MANY_REQUESTS"


class Unavailable(HyperfleetError):
    """503: the daemon cannot serve the request now (store not answering, shutting down)."""

    CODE = "UNAVAILABLE"


class InsufficientStorage(HyperfleetError):
    """507: the daemon's disk is full."""

    CODE = "INSUFFICIENT_STORAGE"


class InternalError(HyperfleetError):
    """500: a fault of the server."""

    CODE = "INTERNAL_ERROR"


#: Exception class for each API error code.
ERROR_CLASSES: Dict[str, Type[HyperfleetError]] = {
    c.CODE: c
    for c in (
        Unauthorized,
        Forbidden,
        QuotaExceeded,
        NotFound,
        MethodNotAllowed,
        BadRequest,
        ValidationError,
        PayloadTooLarge,
        InvalidState,
        Conflict,
        InsufficientCapacity,
        Timeout,
        MachineFailed,
        AgentError,
        BadGateway,
        TooManyRequests,
        Unavailable,
        InsufficientStorage,
        InternalError,
    )
    if c.CODE is not None
}

# When an answer carries no code the SDK knows (a proxy in between, an older
# or newer server), the HTTP status picks the class.
_BY_STATUS: Dict[int, Type[HyperfleetError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    405: MethodNotAllowed,
    409: Conflict,
    413: PayloadTooLarge,
    429: TooManyRequests,
    500: InternalError,
    502: BadGateway,
    503: Unavailable,
    504: Timeout,
    507: InsufficientStorage,
}


def error_from_code(code: Optional[str], message: str, status: Optional[int]) -> HyperfleetError:
    """The exception for an error ``code`` (falling back on the HTTP ``status``)."""
    cls = ERROR_CLASSES.get(code or "")
    if status == 416:
        cls = RangeNotSatisfiable
    elif cls is None:
        cls = _BY_STATUS.get(status or 0, HyperfleetError)
    return cls(message, code=code, status=status)


def error_from_response(status: int, body: bytes, reason: str = "") -> HyperfleetError:
    """The exception for a non-2xx answer with ``body`` (the error envelope,
    or anything else when something other than the daemon answered)."""
    code: Optional[str] = None
    message = ""
    try:
        detail = json.loads(body)["error"]
        code = str(detail["code"])
        message = str(detail["message"])
    except (ValueError, KeyError, TypeError):
        text = body.decode("utf-8", "replace").strip()
        message = text[:500] or reason or f"HTTP {status}"
    return error_from_code(code, message, status)

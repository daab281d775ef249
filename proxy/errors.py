"""One error hierarchy for everything the gateway answers with itself.

Each error knows its HTTP status, a stable snake_case `code` and the OpenAI error
`type`. Dialects render it into their own wire shape (see `proxy.dialects`); nothing
else formats error bodies. Messages are written for clients: they never contain keys,
hashes, upstream URLs or exception text from lower layers.
"""

from __future__ import annotations

from typing import Any


class ProxyError(Exception):
    status: int = 500
    code: str = "internal_error"
    type: str = "api_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        retry_after_s: int | None = None,
        headers: dict[str, str] | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after_s = retry_after_s
        self.headers = dict(headers or {})
        if code is not None:
            self.code = code
        if retry_after_s is not None:
            self.headers.setdefault("Retry-After", str(max(0, int(retry_after_s))))


class InvalidRequest(ProxyError):
    status = 400
    code = "invalid_request_error"
    type = "invalid_request_error"


class UnsupportedParameter(InvalidRequest):
    code = "unsupported_parameter"


class InvalidApiKey(ProxyError):
    status = 401
    code = "invalid_api_key"
    type = "authentication_error"

    def __init__(self, message: str = "Invalid or missing API key.", **kw: Any) -> None:
        super().__init__(message, **kw)


class PermissionDenied(ProxyError):
    status = 403
    code = "permission_denied"
    type = "permission_error"


class ModelNotAllowed(PermissionDenied):
    code = "model_not_allowed"


class NotFound(ProxyError):
    status = 404
    code = "not_found"
    type = "invalid_request_error"


class ModelNotFound(NotFound):
    code = "model_not_found"


class MethodNotAllowed(ProxyError):
    status = 405
    code = "method_not_allowed"
    type = "invalid_request_error"


class Conflict(ProxyError):
    status = 409
    code = "conflict"
    type = "invalid_request_error"


class RequestTooLarge(ProxyError):
    status = 413
    code = "request_too_large"
    type = "invalid_request_error"


class UnsupportedMediaType(ProxyError):
    status = 415
    code = "unsupported_media_type"
    type = "invalid_request_error"


class RateLimited(ProxyError):
    status = 429
    code = "rate_limit_exceeded"
    type = "rate_limit_error"


class QuotaExceeded(ProxyError):
    status = 429
    code = "insufficient_quota"
    type = "insufficient_quota"


class UpstreamError(ProxyError):
    status = 502
    code = "upstream_error"
    type = "api_error"


class ServiceUnavailable(ProxyError):
    status = 503
    code = "service_unavailable"
    type = "api_error"


class ShuttingDown(ServiceUnavailable):
    code = "server_shutting_down"

    def __init__(self, message: str = "The gateway is shutting down.", **kw: Any) -> None:
        kw.setdefault("retry_after_s", 1)
        super().__init__(message, **kw)


class UsageUnavailable(ServiceUnavailable):
    """Usage cannot be kept durably (the spool is full, the disk refuses records): a
    billable call is refused rather than served unbilled (RELIABILITY I8)."""

    code = "usage_recording_unavailable"

    def __init__(
        self, message: str = "The gateway cannot record usage right now; please retry later.", **kw: Any
    ) -> None:
        kw.setdefault("retry_after_s", 30)
        super().__init__(message, **kw)


class UpstreamOverloaded(ServiceUnavailable):
    code = "upstream_overloaded"


class UpstreamTimeout(ProxyError):
    status = 504
    code = "upstream_timeout"
    type = "api_error"

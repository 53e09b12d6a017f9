"""The one exception hierarchy of the gateway; each dialect renders it in its own error shape.

    GatewayError (status, kind)
    ├── InvalidRequest            400  a field is missing, malformed or out of range
    │   ├── UnknownModel          400/404  no alias matches the requested model
    │   ├── CapabilityMissing     400  tools/images/thinking asked of an alias without them
    │   └── ContextOverflow       400  the prompt cannot fit in the alias's context window
    ├── Unauthorized              401  no key
    ├── Forbidden                 403  wrong, revoked or expired key, or alias not allowed
    ├── NotFound                  404  unknown path
    ├── Conflict                  409  a name already taken (the admin API)
    ├── PayloadTooLarge           413  body over the configured limit
    ├── RateLimited               429  a per-key limit is exhausted (carries retry_after)
    │   └── BudgetExceeded        429  the key's spend budget for this period is used up
    ├── Overloaded                503  queue full / gateway saturated / shutting down
    └── UpstreamError             502  the backend failed (connection refused, bad answer)
        ├── UpstreamTimeout       504  connect, first-byte or idle timeout
        └── UpstreamStatus        a backend's 4xx passed through; its 5xx becomes 502

`kind` is a short stable string used in usage rows and metrics. Messages must never contain a
secret: providers build them from provider names, never from URLs with credentials or keys; and
whatever a backend's own text carries, every configured secret is redacted here (ccproxy.redact).
"""

from __future__ import annotations

from typing import Any

from ccproxy.redact import redact


class GatewayError(Exception):
    status: int = 500
    kind: str = "internal_error"

    def __init__(self, message: str, *, status: int | None = None, headers: dict[str, str] | None = None):
        message = redact(message)  # a backend's text may echo a secret (ccproxy.redact)
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        self.headers = headers or {}


class InvalidRequest(GatewayError):
    status = 400
    kind = "invalid_request"

    def __init__(self, message: str, *, param: str | None = None, **kw: Any):
        super().__init__(message, **kw)
        self.param = param


class UnknownModel(InvalidRequest):
    kind = "unknown_model"


class CapabilityMissing(InvalidRequest):
    kind = "capability_missing"


class ContextOverflow(InvalidRequest):
    kind = "context_overflow"


class Unauthorized(GatewayError):
    status = 401
    kind = "unauthorized"


class Forbidden(GatewayError):
    status = 403
    kind = "forbidden"


class NotFound(GatewayError):
    status = 404
    kind = "not_found"


class Conflict(GatewayError):
    status = 409
    kind = "conflict"


class PayloadTooLarge(GatewayError):
    status = 413
    kind = "payload_too_large"


class RateLimited(GatewayError):
    status = 429
    kind = "rate_limited"

    def __init__(self, message: str, *, retry_after: float = 1.0, **kw: Any):
        super().__init__(message, **kw)
        self.retry_after = retry_after
        self.headers.setdefault("retry-after", str(max(1, int(retry_after + 0.999))))


class BudgetExceeded(RateLimited):
    """Retrying before the period resets cannot help: `x-should-retry: false` tells the official
    OpenAI and Anthropic SDKs not to retry (they would otherwise retry a 429)."""

    kind = "budget_exceeded"

    def __init__(self, message: str, *, retry_after: float, **kw: Any):
        super().__init__(message, retry_after=retry_after, **kw)
        self.headers["x-should-retry"] = "false"


class Overloaded(GatewayError):
    status = 503
    kind = "overloaded"


class UpstreamError(GatewayError):
    status = 502
    kind = "upstream_error"

    def __init__(self, message: str, *, provider: str | None = None, retryable: bool = True, **kw: Any):
        super().__init__(message, **kw)
        self.provider = provider
        self.retryable = retryable


class UpstreamTimeout(UpstreamError):
    status = 504
    kind = "timeout"


class UpstreamStatus(UpstreamError):
    """The backend answered with an error status, kept in `upstream_status`. A 4xx is passed on as
    is; a 5xx reaches the client as 502 (with the backend's message), since a 500 would look like
    the gateway's own crash to monitoring."""

    kind = "upstream_status"

    def __init__(self, message: str, *, status: int, provider: str | None = None,
                 retry_after: float | None = None, **kw: Any):
        # 4xx are the client's fault and not worth retrying elsewhere, except 408/429.
        retryable = status >= 500 or status in (408, 429)
        super().__init__(message, provider=provider, retryable=retryable,
                         status=502 if status >= 500 else status, **kw)
        self.upstream_status = status
        self.retry_after = retry_after
        if retry_after is not None:  # the client's SDK honours it, as the backend asked
            self.headers.setdefault("retry-after", str(max(1, int(retry_after + 0.999))))
        if status >= 500 or status in (408, 429):
            self.kind = "upstream_error" if status != 429 else "upstream_rate_limited"
        else:
            self.kind = "upstream_client_error"

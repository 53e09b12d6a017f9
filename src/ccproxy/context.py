"""What the request flow and the dashboard may use of the gateway: narrow, typed views of it.

`pipeline.ChatFlow` (and its subclasses) and `ui.Dashboard` are handed the `app.Gateway`, but they
see it only through these protocols, so what each one depends on is written down and checked by
the type checker, and neither module imports `app` (which imports both). `app.Gateway` and
`app.Runtime` satisfy them structurally; a test may pass any object with the same attributes.
"""

from __future__ import annotations

from typing import Protocol

from ccproxy.auth import Authenticator
from ccproxy.config import Config
from ccproxy.metrics import Metrics
from ccproxy.pricing import PriceBook
from ccproxy.providers.base import ModelListing, Provider
from ccproxy.routing import Router
from ccproxy.services import Budgets, KeyStore, Limiter, UsageSink
from ccproxy.tracing import Tracing
from ccproxy.usage.record import UsageRecord
from ccproxy.usage.store import Store

__all__ = ["DashboardContext", "FlowContext", "GatewayCore", "GatewayServices", "RuntimeView"]


class RuntimeView(Protocol):
    """The part of the gateway a config reload replaces (`app.Runtime`); a request pins one."""

    config: Config
    router: Router
    providers: dict[str, Provider]
    prices: PriceBook
    active: int  # requests pinned to this runtime


class GatewayServices(Protocol):
    """The stateful services (`build_services.Services`, or the no-op defaults in `app`)."""

    @property
    def usage(self) -> UsageSink: ...

    @property
    def limiter(self) -> Limiter: ...

    @property
    def keys(self) -> KeyStore | None: ...

    @property
    def metrics(self) -> Metrics | None: ...

    @property
    def store(self) -> Store | None:
        """None: nothing is stored (no usage reports, no keys in a database)."""
        ...

    @property
    def budgets(self) -> Budgets | None:
        """None: budgets are not enforced."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


class GatewayCore(Protocol):
    """What every part served by the gateway reads: the current runtime, the services, auth."""

    @property
    def runtime(self) -> RuntimeView: ...

    @property
    def services(self) -> GatewayServices: ...

    @property
    def authenticator(self) -> Authenticator: ...


class FlowContext(GatewayCore, Protocol):
    """What one request flow uses: the runtime it pins, auth, limits and usage, tracing, metrics."""

    @property
    def tracing(self) -> Tracing | None: ...

    def observe(self, record: UsageRecord, admitted: bool) -> None:
        """Metrics for one finished request (never raises)."""
        ...


class DashboardContext(GatewayCore, Protocol):
    """What the dashboard (`ui.Dashboard`) shows and uses: config, auth, services and live state."""

    @property
    def started_at(self) -> float: ...

    @property
    def in_flight(self) -> int: ...

    @property
    def draining(self) -> bool: ...

    async def probe_backends(self) -> dict[str, ModelListing]: ...

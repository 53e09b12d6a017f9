"""The part of the gateway a config reload replaces, and the reload itself.

`Runtime` holds the config, the router, the price book and the providers. A reload builds and
starts a new one (`replace_runtime`: unchanged providers, the deployments' health and the
sessions' placements carry over; if the new one cannot start, the old one keeps serving), the
gateway swaps it in atomically, and `Retirer`
closes the old one once nothing uses it: chat requests pin the runtime they started with
(`Runtime.active`) and finish on it however long they stream; other endpoints use it for a moment
only (RETIRE_GRACE).
"""

from __future__ import annotations

import asyncio

from ccproxy import redact
from ccproxy.affinity import SessionPlacements
from ccproxy.config import Config
from ccproxy.pricing import PriceBook
from ccproxy.providers import make_provider
from ccproxy.providers.base import Provider
from ccproxy.routing import DeploymentHealth, Router
from ccproxy.services import DiscardUsage, UnlimitedLimiter

RETIRE_GRACE = 2.0  # seconds before a replaced runtime may close (non-chat endpoints finish)
RETIRE_POLL = 0.5


class Runtime:
    """Config + router + providers: the part a hot reload replaces."""

    def __init__(self, config: Config, health: dict[tuple[str, str], DeploymentHealth] | None = None,
                 reuse: dict[str, Provider] | None = None, placements: SessionPlacements | None = None):
        redact.use_config(config)  # its secrets never leave the gateway (errors, logs)
        self.config = config
        self.router = Router(config, health, placements)
        self.prices = PriceBook(config)  # warns once per model that `price: auto` cannot price
        self.active = 0  # chat requests pinned to this runtime; a retired runtime closes when it is 0
        reuse = reuse or {}
        self.providers: dict[str, Provider] = {}
        for name, pc in config.providers.items():
            old = reuse.get(name)
            self.providers[name] = old if old is not None and old.config == pc else make_provider(name, pc)

    async def start(self) -> None:
        await asyncio.gather(*(p.start() for p in self.providers.values()))

    async def close(self, keep: set[int] | None = None) -> None:
        keep = keep or set()
        await asyncio.gather(*(p.close() for p in self.providers.values() if id(p) not in keep),
                             return_exceptions=True)


class NullServices:
    """The defaults when the full services layer is not wired: nothing stored, nothing limited."""

    def __init__(self) -> None:
        self.usage = DiscardUsage()
        self.limiter = UnlimitedLimiter()
        self.keys = None
        self.metrics = None
        self.store = None
        self.budgets = None

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


async def replace_runtime(old: Runtime, config: Config) -> Runtime:
    """A started runtime for `config`, reusing `old`'s unchanged providers and its deployments'
    health. If it cannot start, what it opened is closed and the error raised: `old` keeps serving."""
    new = Runtime(config, old.router.health, old.providers, old.router.placements)
    try:
        await new.start()
    except BaseException:
        await new.close(keep={id(p) for p in old.providers.values()})  # the old runtime keeps serving
        raise
    return new


class Retirer:
    """Closes replaced runtimes once nothing uses them, keeping the providers the new one reuses."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def retire(self, old: Runtime, new: Runtime) -> None:
        kept = {id(p) for p in new.providers.values()}

        async def retire() -> None:
            await asyncio.sleep(RETIRE_GRACE)
            while old.active > 0:
                await asyncio.sleep(RETIRE_POLL)
            await old.close(keep=kept)

        task = asyncio.get_running_loop().create_task(retire())
        self._tasks.add(task)  # a strong reference: the loop keeps only weak ones
        task.add_done_callback(self._tasks.discard)

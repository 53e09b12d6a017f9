"""`ccproxy check` and the start-up check: does the config agree with what really runs?

For every alias deployment: is its provider reachable, and does the upstream model exist there
(Ollama /api/tags, OpenAI-compatible /v1/models, Anthropic /v1/models)?
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from ccproxy.config import Config
from ccproxy.providers.base import ModelListing, Provider

PROBE_TIMEOUT = 5.0


@dataclass(slots=True)
class CheckRow:
    alias: str
    provider: str
    upstream_model: str
    reachable: bool
    model_present: bool | None  # None: the backend cannot list models
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.reachable and self.model_present is not False


def model_listed(model: str, names: list[str]) -> bool:
    if model in names:
        return True
    # Ollama: "llama2" is "llama2:latest"
    if ":" not in model and f"{model}:latest" in names:
        return True
    return False


async def _probe(p: Provider) -> ModelListing:
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            return await p.list_models()
    except TimeoutError:
        return ModelListing(False, [], f"no answer within {PROBE_TIMEOUT:g} s")
    except Exception as e:  # a check reports, it does not crash
        return ModelListing(False, [], f"{type(e).__name__}: {e}")


async def run_checks(config: Config, providers: dict[str, Provider]) -> list[CheckRow]:
    names = list(providers)
    listings = dict(zip(names, await asyncio.gather(*(_probe(providers[n]) for n in names)), strict=True))
    rows = []
    for alias, a in config.models.items():
        for d in a.all_deployments():
            lst = listings[d.provider]
            ptype = config.providers[d.provider].type
            present: bool | None
            if not lst.reachable:
                present = False
            elif ptype == "embedded":
                present = True  # the embedded engine serves its one model under any name
            else:
                present = model_listed(d.model, lst.models)
            rows.append(CheckRow(alias, d.provider, d.model, lst.reachable, present, lst.error))
    return rows


def format_table(rows: list[CheckRow]) -> str:
    header = ("ALIAS", "PROVIDER", "UPSTREAM MODEL", "REACHABLE", "MODEL PRESENT")
    data = [(r.alias, r.provider, r.upstream_model, "yes" if r.reachable else "NO",
             "yes" if r.model_present else ("?" if r.model_present is None else "NO")) for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *data, strict=False)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in [header, *data]]
    for r in rows:
        if r.error:
            lines.append(f"  {r.provider}: {r.error}")
    return "\n".join(dict.fromkeys(lines))  # one error line per provider

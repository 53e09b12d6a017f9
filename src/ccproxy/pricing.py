"""What a request cost, in US dollars: prices per alias and deployment, and the arithmetic.

A price is USD per million tokens for four kinds of token: uncached input, output, cache reads and
cache writes (`Usage` counts them apart, Anthropic's way: `input_tokens` excludes cached tokens).
Cache prices not given cost as much as input: an unknown discount is never assumed.

`price:` on a deployment overrides the one on its alias. `price: auto` takes the price of the
deployment's backend model name from the `genai-prices` package's bundled data
(https://github.com/pydantic/genai-prices), read once at start-up and on reload; it never fetches
anything (its `UpdatePrices` is never started). Some hosted models are priced by prompt length
("cliff" tiers: past a threshold, every token of the request costs the tier's price); those tiers
are kept. A model the data does not know gets no price, one warning per load, and its rows a cost of
None: never a guess.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from ccproxy.core import Usage

if TYPE_CHECKING:
    from ccproxy.config import Config, Deployment, PriceConfig

log = logging.getLogger("ccproxy.pricing")

__all__ = ["Price", "PriceBook", "auto_price", "cost_usd", "worst_case_usd"]

MTOK = 1_000_000
# Output tokens a budget reserves for a request with no max_tokens at all (no client value, and the
# alias has neither max_output_tokens nor context_window to clamp it).
DEFAULT_OUTPUT_RESERVE = 4096


@dataclass(frozen=True, slots=True)
class Rates:
    """USD per million tokens."""

    input: float
    output: float
    cache_read: float
    cache_write: float


@dataclass(frozen=True, slots=True)
class Price:
    base: Rates
    # (prompt tokens from which it applies, rates), ascending: a prompt of at least `start` tokens
    # (cached ones included) pays that tier's rates for every token of the request.
    tiers: tuple[tuple[int, Rates], ...] = ()
    source: str = "config"  # "config" or "genai-prices <model id>"

    @classmethod
    def of(cls, input: float, output: float, cache_read: float | None = None,
           cache_write: float | None = None, source: str = "config") -> Price:
        return cls(Rates(input, output, input if cache_read is None else cache_read,
                         input if cache_write is None else cache_write), source=source)

    def rates(self, prompt_tokens: int) -> Rates:
        chosen = self.base
        for start, rates in self.tiers:
            if prompt_tokens >= start:
                chosen = rates
        return chosen

    def describe(self) -> dict[str, Any]:
        """For `route --explain`: USD per million tokens."""
        b = self.base
        out: dict[str, Any] = {"input": b.input, "output": b.output, "cache_read": b.cache_read,
                               "cache_write": b.cache_write, "source": self.source}
        if self.tiers:
            out["tiers"] = [{"from_prompt_tokens": s, "input": r.input, "output": r.output}
                            for s, r in self.tiers]
        return out


def cost_usd(price: Price | None, usage: Usage) -> float | None:
    """The cost of one request's final usage; None when the model has no price."""
    if price is None:
        return None
    r = price.rates(usage.prompt_tokens)
    total = (usage.input_tokens * r.input + usage.output_tokens * r.output
             + usage.cache_read_tokens * r.cache_read + usage.cache_creation_tokens * r.cache_write)
    return round(total / MTOK, 10)


def worst_case_usd(price: Price | None, prompt_tokens: int, max_output_tokens: int) -> float:
    """The most a request can cost before it runs (for budget reservations): every prompt token at
    the dearer of input and cache-write prices, every allowed output token at the output price."""
    if price is None:
        return 0.0
    r = price.rates(prompt_tokens)
    return (prompt_tokens * max(r.input, r.cache_write) + max_output_tokens * r.output) / MTOK


# --------------------------------------------------------------------------- genai-prices


def _num(v: Any) -> float | None:
    return None if v is None else float(v)


def _split(v: Any) -> tuple[float | None, list[tuple[int, float]]]:
    """A genai-prices value (Decimal, TieredPrices or None) -> base and tier prices."""
    if v is None or isinstance(v, Decimal | int | float):
        return _num(v), []
    return float(v.base), [(int(t.start), float(t.price)) for t in v.tiers]


def auto_price(model: str, *, when: datetime | None = None) -> Price | None:
    """The price of a hosted model by name from the bundled genai-prices data, or None."""
    from genai_prices import data_snapshot  # bundled data only; nothing here reaches the network

    try:
        _, info = data_snapshot.get_snapshot().find_provider_model(model, None, None, None)
    except LookupError:
        return None
    mp = info.get_prices(when or datetime.now(UTC))
    parts = {k: _split(getattr(mp, f"{k}_mtok", None)) for k in ("input", "output", "cache_read", "cache_write")}
    if parts["input"][0] is None or parts["output"][0] is None:
        return None  # priced by something other than tokens (images, audio, requests)
    starts = sorted({s for _, tiers in parts.values() for s, _ in tiers})

    def rates_at(start: int | None) -> Rates:
        vals: dict[str, float | None] = {}
        for k, (base, tiers) in parts.items():
            vals[k] = base
            for s, p in tiers:
                if start is not None and s <= start:
                    vals[k] = p
        inp = vals["input"] or 0.0
        return Rates(inp, vals["output"] or 0.0, inp if vals["cache_read"] is None else vals["cache_read"],
                     inp if vals["cache_write"] is None else vals["cache_write"])

    return Price(rates_at(None), tuple((s, rates_at(s)) for s in starts), source=f"genai-prices {info.id}")


# --------------------------------------------------------------------------- per config


class PriceBook:
    """Every deployment's price for one config, resolved once (at start-up and on each reload)."""

    def __init__(self, config: Config) -> None:
        self._prices: dict[tuple[str, str, str], Price | None] = {}
        unknown: set[str] = set()
        for alias, a in config.models.items():
            for d in a.all_deployments():
                spec = d.price if d.price is not None else a.price
                price = self._resolve(spec, d)
                if spec == "auto" and price is None:
                    unknown.add(d.model)
                self._prices[(alias, d.provider, d.model)] = price
        for model in sorted(unknown):
            log.warning("price: auto: no price known for model %r; its requests are recorded without a cost "
                        "(give price: {input, output} on the alias or deployment)", model)

    @staticmethod
    def _resolve(spec: PriceConfig | str | None, d: Deployment) -> Price | None:
        if spec is None:
            return None
        if spec == "auto":
            return auto_price(d.model)
        assert not isinstance(spec, str)
        return Price.of(spec.input, spec.output, spec.cache_read, spec.cache_write)

    def get(self, alias: str, deployment: Deployment) -> Price | None:
        return self._prices.get((alias, deployment.provider, deployment.model))

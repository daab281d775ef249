"""Cost of a request from its usage and the model's configured prices (USD per 1M tokens)."""

from __future__ import annotations

from proxy.config import Price
from proxy.metering.base import Usage

_M = 1_000_000


def _usd(per_mtok_total: float) -> float:
    """USD from a sum of tokens x USD-per-million, rounded to 1e-10 USD: through an int
    (round(x, 10) goes through a decimal string, 3x the cost; both run per request)."""
    return round(per_mtok_total * (1e10 / _M)) / 1e10


def cost_usd(price: Price, usage: Usage) -> float:
    """prompt_tokens counts every input token; cache reads/writes are priced apart."""
    cached = min(usage.cached_tokens, usage.prompt_tokens)
    created = min(usage.cache_creation_tokens, usage.prompt_tokens - cached)
    plain = usage.prompt_tokens - cached - created
    cached_price = price.input_per_mtok if price.cached_input_per_mtok is None else price.cached_input_per_mtok
    write_price = price.input_per_mtok if price.cache_write_per_mtok is None else price.cache_write_per_mtok
    total = (
        plain * price.input_per_mtok
        + cached * cached_price
        + created * write_price
        + usage.completion_tokens * price.output_per_mtok
    )
    return _usd(total)


def max_cost_usd(price: Price, prompt_tokens: int, max_output_tokens: int) -> float:
    """Upper estimate used to reserve budget before the request runs."""
    return _usd(prompt_tokens * price.input_per_mtok + max_output_tokens * price.output_per_mtok)

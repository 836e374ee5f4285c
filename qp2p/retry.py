"""Exponential backoff with jitter under a time budget (``RetryConfig``)."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

from .config import RetryConfig
from .errors import ConnectionError, PeerAuthenticationError

__all__ = ["backoff_delays", "format_seconds", "retry_dial"]

logger = logging.getLogger("qp2p.retry")
T = TypeVar("T")


def backoff_delays(retry: RetryConfig, rng: random.Random | None = None) -> Iterator[float]:
    """Successive waits: ``initial * multiplier**n`` capped at ``max_interval``, jittered."""
    rng = rng or random.Random()
    interval = retry.initial_interval
    while True:
        spread = retry.randomization_factor * interval
        yield max(0.0, interval + rng.uniform(-spread, spread))
        interval = min(interval * retry.multiplier, retry.max_interval)


async def retry_dial(
    attempt: Callable[[float], Awaitable[T]],
    retry: RetryConfig,
    attempt_timeout: float,
    what: str,
) -> T:
    """Call ``attempt(timeout)`` until it succeeds or ``retry.max_elapsed_time`` is spent.

    Timeouts and refusals are retried; an authentication failure is final (dialling the
    same peer again gives the same answer). The budget bounds the whole call: the last
    attempt is cut short rather than overrunning it.
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = started + retry.max_elapsed_time
    delays = backoff_delays(retry)
    last: BaseException | None = None
    tries = 0
    while True:
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        tries += 1
        cut_short = remaining < attempt_timeout
        try:
            return await attempt(min(attempt_timeout, remaining))
        except PeerAuthenticationError:
            raise
        except (OSError, asyncio.TimeoutError, ConnectionError) as exc:
            # an attempt the budget cut short says less than a real answer before it
            # (e.g. "refused: endpoint at max_connections"): report that one
            if not (cut_short and isinstance(exc, asyncio.TimeoutError) and last is not None):
                last = exc
            logger.debug("dial %s attempt %d failed: %r", what, tries, exc)
        wait = next(delays)
        if loop.time() + wait >= deadline:
            break
        await asyncio.sleep(wait)
    # the time actually spent, not the budget: a person compares it with what they waited
    raise ConnectionError(
        f"could not connect to {what} after {tries} attempt{'' if tries == 1 else 's'} in "
        f"{format_seconds(loop.time() - started)}: {_describe(last)}"
    ) from last


def format_seconds(seconds: float) -> str:
    """``0.52s``, ``3.1s``, ``12s``: a duration for messages, as precise as it matters."""
    if seconds < 1:
        return f"{seconds:.2f}s"
    if seconds < 10:
        return f"{seconds:.1f}s"
    return f"{seconds:.0f}s"


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "no attempt fitted the time budget"
    text = " ".join(str(exc).split())
    return text if text else type(exc).__name__

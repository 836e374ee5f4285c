"""Log lines a peer can trigger, rate limited: one line per cause per interval.

A hostile peer can make an endpoint refuse a handshake or reject a stream as often as it
can send packets; logging each one would let it flood the log. A :class:`RateLimitedLog`
writes the first occurrence of a cause at once, counts the ones that follow within
``interval`` seconds, and reports that count with the next line it writes for the cause.
Causes are short constant strings chosen by the code (never text from a peer), so the
table stays as small as the set of call sites.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

__all__ = ["DEFAULT_INTERVAL", "RateLimitedLog"]

#: Seconds between two lines for the same cause.
DEFAULT_INTERVAL = 10.0


class RateLimitedLog:
    """Writes to ``logger`` at most one line per cause per ``interval`` seconds."""

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = DEFAULT_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.interval = interval
        self._clock = clock
        # cause -> [time of the last line written, occurrences suppressed since]
        self._causes: dict[str, list[float]] = {}

    def log(self, level: int, cause: str, msg: str, *args: object,
            exc_info: bool = False) -> bool:
        """Log ``msg % args`` unless ``cause`` was logged less than ``interval`` ago;
        returns whether a line was written (``exc_info``: with the current traceback)."""
        if not self.logger.isEnabledFor(level):
            return False
        now = self._clock()
        entry = self._causes.get(cause)
        if entry is not None and now - entry[0] < self.interval:
            entry[1] += 1
            return False
        if entry is not None and entry[1]:
            msg += " (and %d more like this in the last %.0f s)"
            args = (*args, int(entry[1]), now - entry[0])
        self._causes[cause] = [now, 0]
        self.logger.log(level, msg, *args, exc_info=exc_info)
        return True

    def warning(self, cause: str, msg: str, *args: object) -> bool:
        """``log(logging.WARNING, ...)``."""
        return self.log(logging.WARNING, cause, msg, *args)

    def exception(self, cause: str, msg: str, *args: object) -> bool:
        """``log(logging.ERROR, ..., exc_info=True)``, for use in an ``except`` block."""
        return self.log(logging.ERROR, cause, msg, *args, exc_info=True)

    def info(self, cause: str, msg: str, *args: object) -> bool:
        """``log(logging.INFO, ...)``."""
        return self.log(logging.INFO, cause, msg, *args)

    def suppressed(self, cause: str) -> int:
        """Occurrences of ``cause`` counted but not yet reported."""
        entry = self._causes.get(cause)
        return int(entry[1]) if entry is not None else 0

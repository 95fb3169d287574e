"""Progress of the loops that take more than a few seconds (training epochs, the prefix cache's build,
an evaluation's forward pass, the few-shot banks, the figures).

:func:`progress` wraps an iterable: on a terminal (stderr is a TTY) it is a tqdm bar; elsewhere (a
redirected stderr, a SLURM ``.err`` file, a run log) a log line at most every
:attr:`LineProgress.every_s` seconds with the count done, the rate and the time elapsed, so that the
log stays readable; disabled, the iterable itself is returned, untouched. The one switch is
``train.progress`` (a run's training, prefix cache, few-shot banks and evaluation alike). Summary
lines (an epoch's loss, a target's evaluation time) are the callers' own.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable

__all__ = ["LineProgress", "plural", "progress"]

log = logging.getLogger("feclip.progress")


def progress(
    iterable: Iterable,
    enabled: bool,
    desc: str,
    total: int,
    *,
    unit: str = "batch",
    count: Callable[[object], int] | None = None,
    logger: logging.Logger | None = None,
):
    """``iterable`` with progress shown: a tqdm bar on a terminal, periodic log lines elsewhere.

    Args:
        iterable: what is iterated (a ``DataLoader``, a list of categories, ...); yielded unchanged.
        enabled: ``False`` returns ``iterable`` itself (callers may test ``bar is iterable``).
        desc: the label (``"epoch 2/9"``, ``"set_b: predict"``).
        total: the number of ``unit`` expected in all.
        unit: what is counted (``"batch"``, ``"image"``, ``"category"``), singular (:func:`plural`).
        count: the units in one item (e.g. the images of a batch); ``None`` = 1 per item.
        logger: where the lines go (default ``feclip.progress``).

    The returned object iterates like ``iterable`` and has ``set_postfix(**values)`` (shown on the bar
    or appended to the lines).
    """
    if not enabled:
        return iterable
    if not sys.stderr.isatty():
        return LineProgress(iterable, desc, total, unit=unit, count=count, logger=logger)
    return _Bar(iterable, desc, total, unit, count)


class _Bar:
    """A tqdm bar that advances by ``count(item)`` per item."""

    def __init__(self, iterable, desc: str, total: int, unit: str, count) -> None:
        from tqdm.auto import tqdm

        self.iterable, self.count = iterable, count
        self.bar = tqdm(desc=desc, total=total, unit=f" {plural(unit)}", leave=False, dynamic_ncols=True)

    def set_postfix(self, **values) -> None:
        self.bar.set_postfix(**values)

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.bar.update(1 if self.count is None else self.count(item))
        finally:
            self.bar.close()


class LineProgress:
    """Iterates ``iterable``, logging ``desc: done/total units (rate units/s, elapsed s, postfix)`` every
    :attr:`every_s` seconds (none after the last item: the caller's summary follows)."""

    every_s = 60.0

    def __init__(
        self,
        iterable,
        desc: str,
        total: int,
        *,
        unit: str = "batch",
        count: Callable[[object], int] | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        self.iterable, self.desc, self.total, self.unit, self.count = iterable, desc, total, unit, count
        self.logger = logger or log
        self.postfix = ""

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def __iter__(self):
        start = last = time.perf_counter()
        done = 0
        for item in self.iterable:
            yield item
            done += 1 if self.count is None else self.count(item)
            now = time.perf_counter()
            if now - last >= self.every_s and done < self.total:
                last = now
                rate = done / max(now - start, 1e-9)
                extra = f", {self.postfix}" if self.postfix else ""
                units = plural(self.unit)
                self.logger.info(
                    "%s: %d/%d %s (%.1f %s/s, %.0f s%s)",
                    self.desc,
                    done,
                    self.total,
                    units,
                    rate,
                    units,
                    now - start,
                    extra,
                )


def plural(unit: str) -> str:
    """``batch`` -> ``batches``, ``category`` -> ``categories``, ``image`` -> ``images``."""
    if unit.endswith(("ch", "sh", "s", "x")):
        return unit + "es"
    if unit.endswith("y") and unit[-2:-1] not in ("a", "e", "o", "u"):
        return unit[:-1] + "ies"
    return unit + "s"

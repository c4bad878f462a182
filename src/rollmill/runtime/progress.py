"""How a training run shows its steps: a tqdm bar on a terminal, one plain log line per step elsewhere."""

from __future__ import annotations

import logging
import sys
import time

from tqdm import tqdm

log = logging.getLogger(__name__)


class StepProgress:
    """Reports each finished step, as a context manager around the run loop.

    With `bar` and stderr a terminal: a tqdm bar, and while it is up the root logger's console handlers
    print through `tqdm.write`, so a log line gets a line of its own instead of being glued onto the bar.
    Otherwise (`bar` off, or stderr a file as in a cluster job, where every redraw of a bar would be one
    more carriage-return fragment in the log): one INFO line per step."""

    def __init__(self, total: int, initial: int, headline: str, bar: bool = True):
        self.total, self.initial, self.headline, self.want_bar = total, initial, headline, bar
        self.bar: tqdm | None = None
        self._saved_handlers: list[logging.Handler] = []
        self._last = time.perf_counter()

    def __enter__(self) -> StepProgress:
        self._last = time.perf_counter()
        if self.want_bar and sys.stderr.isatty():
            self.bar = tqdm(total=self.total, initial=self.initial, desc="train", dynamic_ncols=True)
            self._saved_handlers = _route_console_through_tqdm()
        return self

    def __exit__(self, *exc) -> bool:
        if self.bar is not None:
            self.bar.close()
            logging.getLogger().handlers = self._saved_handlers
            self.bar = None
        return False

    def step_done(self, step: int, record: dict) -> None:
        """Show step `step` finished with metrics `record`."""
        now = time.perf_counter()
        seconds, self._last = now - self._last, now
        if self.bar is None:
            log.info("%s", step_line(step, self.total, record, self.headline, seconds))
            return
        self.bar.update(1)
        self.bar.set_postfix(reward=f"{record.get('reward/mean', 0.0):.3f}", loss=f"{record.get('loss', 0.0):.4f}", **(
            {"eval": f"{record[self.headline]:.3f}"} if self.headline in record else {}))


def step_line(step: int, total: int, record: dict, headline: str, seconds: float) -> str:
    """One step's log line: reward, loss and held-out `headline` where the record has them, and the wall
    seconds since the previous step ended (rollout, update, and any eval or checkpoint in between)."""
    parts = [f"step {step}/{total}"]
    for key, label, fmt in (("reward/mean", "reward", ".3f"), ("loss", "loss", ".4f"), (headline, headline, ".3f")):
        if key in record:
            parts.append(f"{label} {record[key]:{fmt}}")
    parts.append(f"{seconds:.2f} s")
    return "  ".join(parts)


class _TqdmWriteHandler(logging.StreamHandler):
    """A console handler that prints through `tqdm.write`: it clears the bar, writes the line and
    redraws the bar below it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


def _route_console_through_tqdm() -> list[logging.Handler]:
    """Swap the root logger's handlers that write to stdout/stderr for `_TqdmWriteHandler`s (same level,
    format and filters); file handlers stay. Returns the handlers to restore. Unlike tqdm's own
    `logging_redirect_tqdm`, this adds no console handler where there was none, so a library user who
    left logging unconfigured does not start seeing log lines."""
    root = logging.getLogger()
    saved = root.handlers
    root.handlers = [_through_tqdm(h) if _writes_to_console(h) else h for h in saved]
    return saved


def _writes_to_console(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stdout, sys.stderr)


def _through_tqdm(handler: logging.StreamHandler) -> _TqdmWriteHandler:
    out = _TqdmWriteHandler(handler.stream)
    out.setLevel(handler.level)
    out.setFormatter(handler.formatter)
    for f in handler.filters:
        out.addFilter(f)
    return out

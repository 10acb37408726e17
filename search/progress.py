"""What a sweep prints while its trials run: a line per running trial, a sweep bar, epoch lines.

The channel, from the trial to the console:

1. :class:`TrialProgress`, a Lightning callback in the trial, keeps the trial's state (phase,
   epoch, current sparsity, the latest validation metric, mean train loss, ETA) and sends a
   small record at most once per :data:`SEND_INTERVAL_S`, never before the trial has run
   :data:`SEND_AFTER_S` (so the digits demo's sub-second trials send nothing), and one record
   per epoch under ``trial.verbose``.
2. The records go to the sweep's board: one small entry per trial in Ray's internal key-value
   store (the cluster's GCS, which Ray Tune's own registry uses), named by :func:`board_name`
   from the sweep's storage root; no process is started for it, and a sweep of fast trials
   writes nothing.
3. On the driver, a Tune callback (:func:`make_progress_callback`) reads the board from Tune's
   loop every :data:`POLL_S` and hands the records to :class:`ProgressDisplay`, which decides
   what is printed: at most one status every :data:`TTY_INTERVAL_S` on a terminal (a block
   redrawn in place: the sweep bar and one line per running trial) or every
   :data:`LOG_INTERVAL_S` in a log (the bar and the lines of trials with news, each trial at
   most once per interval); nothing for a trial that has run less than :data:`QUIET_S`.

Not ``tune.report``: every Tune result must carry all objectives, schedulers (ASHA) would take
a progress record for a rung result, and a trial interrupted after one would look stopped early.
Not a Ray actor: starting its process took 1 to 10 s on a busy 2-core machine, longer than the
trials it would report on.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from search.formatting import format_metric
from search.progress_board import (NAMESPACE, SEND_AFTER_S, SEND_INTERVAL_S, _value, board_name, fetch, forget,
                                   format_duration, format_epoch_line, publish)

__all__ = ["LOG_INTERVAL_S", "QUIET_S", "SEND_AFTER_S", "SEND_INTERVAL_S", "TTY_INTERVAL_S", "BoardReader",
           "ProgressDisplay", "board_name", "format_duration", "format_epoch_line",
           "format_sweep_bar", "format_trial_line", "fetch", "forget", "live_progress", "make_progress_callback",
           "note_front", "publish", "TrialProgress", "trial_progress"]

log = logging.getLogger("search")

#: A trial is shown once it has run this long (seconds): fast trials only print their end line.
QUIET_S = 2.0
#: The redrawn block on a terminal is updated at most this often (seconds).
TTY_INTERVAL_S = 1.0
#: In a log (not a terminal) a status is printed at most this often, each trial at most once.
LOG_INTERVAL_S = 5.0
#: How often the driver asks the board for news (seconds); it never waits for the answer.
POLL_S = 0.5


# ---------------------------------------------------------------------------------------------
# Lines
# ---------------------------------------------------------------------------------------------


def format_trial_line(record: Mapping[str, Any]) -> str:
    """The live line of a running trial: phase, epoch, done, sparsity, validation metric, train
    loss, time so far and ETA (of its training; export and the test pass come after)."""
    metric = record.get("metric") or "val_acc"
    eta = record.get("eta_s")
    return (f"  {record['trial']} {str(record.get('method') or '?'):<10} {str(record.get('phase') or ''):<8} "
            f"epoch {record.get('epoch', 0)}/{record.get('epochs', 0)} {100 * float(record.get('done', 0.0)):3.0f}%  "
            f"sparsity {_value('sparsity', record.get('sparsity'))}  {metric} {_value(metric, record.get('value'))}  "
            f"loss {_value('loss', record.get('loss'))}  {format_duration(record.get('elapsed_s'))}"
            + ("  (export, test split, tracking)" if record.get("phase") == "measure"
               else f"  ETA {format_duration(eta) if eta is not None else '?'}"))


def format_sweep_bar(finished: int, failed: int, running: int, n_trials: int, front_size: int = 0,
                     hypervolume: float | None = None, elapsed_s: float | None = None, width: int = 20) -> str:
    """``sweep [#####.....] 5/20 ended (1 failed), 2 running  front 3  hv 0.7123 of the box  1m32s``:
    the bar fills with ended trials (finished and failed); ``hypervolume`` is the front's,
    normalised by the reference box."""
    ended = finished + failed
    filled = min(width, int(round(width * ended / n_trials))) if n_trials > 0 else 0
    text = (f"sweep [{'#' * filled}{'.' * (width - filled)}] {ended}/{n_trials} ended"
            + (f" ({failed} failed)" if failed else "") + f", {running} running")
    if front_size:
        text += f"  front {front_size}"
        if hypervolume is not None and math.isfinite(hypervolume):
            text += f"  hv {hypervolume:.4f} of the box"
    if elapsed_s is not None:
        text += f"  {format_duration(elapsed_s)}"
    return text


# ---------------------------------------------------------------------------------------------
# Driver: what is printed, when
# ---------------------------------------------------------------------------------------------


class ProgressDisplay:
    """Decides what the driver prints while trials run (thread-safe; pure of Ray).

    Args:
        n_trials: the sweep's budget of trials (the bar's length).
        stream: where lines go (default ``sys.stdout``).
        tty: redraw a block in place (default: whether ``stream`` is a terminal); else plain lines.
        quiet_s: a trial is shown once its record says it has run this long (seconds).
        interval_s: at most one status per this many seconds (default :data:`TTY_INTERVAL_S`
            on a terminal, :data:`LOG_INTERVAL_S` otherwise); in plain lines each trial appears
            at most once per interval, and only when it has news.
        max_trials: running trials shown in the terminal block (the rest are counted).
        clock: seconds, monotonic (tests pass their own).
    """

    def __init__(self, n_trials: int, stream: Any = None, tty: bool | None = None, quiet_s: float = QUIET_S,
                 interval_s: float | None = None, max_trials: int = 8, clock: Any = time.monotonic) -> None:
        self.n_trials = int(n_trials)
        self.stream = stream if stream is not None else sys.stdout
        if tty is None:
            isatty = getattr(self.stream, "isatty", None)
            tty = bool(isatty()) if callable(isatty) else False
        self.tty = tty
        self.quiet_s = quiet_s
        self.interval_s = interval_s if interval_s is not None else (TTY_INTERVAL_S if tty else LOG_INTERVAL_S)
        self.max_trials = max_trials
        self.clock = clock
        self.started = clock()
        self.live: dict[str, dict[str, Any]] = {}  # the latest record of each running trial
        self._news: set[str] = set()  # trials with a record not printed yet (plain lines)
        self._ended: set[str] = set()
        self._printed_at: dict[str, float] = {}
        self._last_status = -math.inf
        self.counts = (0, 0, 0)  # finished, failed, running
        self.front: tuple[int, float | None] = (0, None)
        self._lock = threading.RLock()
        self._block: list[str] = []  # the terminal block last drawn
        self._drawn = 0  # lines of it on the screen now
        self._line_start = True  # the stream's cursor is at the start of a line
        self.shown = False  # anything was shown (the terminal keeps its bar from then on)

    # -- inputs --------------------------------------------------------------------------------
    def update(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Take records from trials: epoch records are printed now, live ones kept."""
        with self._lock:
            for record in records:
                trial = str(record["trial"])
                if record.get("kind") == "epoch":
                    self._print([format_epoch_line(record)])
                if trial not in self._ended:  # a late record of an ended trial is no live line
                    self.live[trial] = dict(record)
                    self._news.add(trial)

    def set_counts(self, finished: int, failed: int, running: int) -> None:
        """The sweep's trial counts (from Tune's trial list)."""
        self.counts = (int(finished), int(failed), int(running))

    def set_front(self, size: int, hypervolume: float | None) -> None:
        """The current front's size and normalised hypervolume."""
        self.front = (int(size), hypervolume)

    def trial_ended(self, trial_id: str) -> None:
        """A trial ended: it leaves the live lines (its end line is printed by the sweep)."""
        with self._lock:
            self.live.pop(str(trial_id), None)
            self._news.discard(str(trial_id))
            self._ended.add(str(trial_id))

    # -- decisions -----------------------------------------------------------------------------
    def bar(self, now: float | None = None) -> str:
        """The sweep bar now."""
        now = self.clock() if now is None else now
        return format_sweep_bar(*self.counts, self.n_trials, self.front[0], self.front[1], now - self.started)

    def due(self, now: float | None = None) -> list[str] | None:
        """The lines a status now would print, or None when none is due (too soon, or no
        trial has run :attr:`quiet_s`). Marks nothing; :meth:`tick` prints and marks."""
        return self._due(self.clock() if now is None else now)[0]

    def _due(self, now: float) -> tuple[list[str] | None, list[str]]:
        with self._lock:
            if now - self._last_status < self.interval_s:
                return None, []
            long = [r for r in self.live.values() if float(r.get("elapsed_s") or 0.0) >= self.quiet_s]
            if self.tty:
                if not long and not self.shown:
                    return None, []
                lines = [self.bar(now)] + [format_trial_line(r) for r in long[:self.max_trials]]
                if len(long) > self.max_trials:
                    lines.append(f"  ... and {len(long) - self.max_trials} more running")
                return lines, []
            fresh = [r for r in long if str(r["trial"]) in self._news
                     and now - self._printed_at.get(str(r["trial"]), -math.inf) >= self.interval_s]
            if not fresh:
                return None, []
            return [self.bar(now)] + [format_trial_line(r) for r in fresh], [str(r["trial"]) for r in fresh]

    def tick(self, now: float | None = None) -> None:
        """Print a status if one is due (see :meth:`due`); on a terminal, also redraw a block
        another writer cleared."""
        now = self.clock() if now is None else now
        with self._lock:
            lines, trials = self._due(now)
            if lines is None:
                if self.tty and self._block and not self._drawn and self._line_start:
                    self._draw(self._block)
                return
            self._last_status = now
            self.shown = True
            if self.tty:
                self._draw(lines)
                return
            for trial in trials:
                self._printed_at[trial] = now
                self._news.discard(trial)
            self._print(lines)

    # -- output --------------------------------------------------------------------------------
    def _print(self, lines: Sequence[str]) -> None:
        with self._lock:
            self._clear()
            self.stream.write("".join(line + "\n" for line in lines))
            self.stream.flush()
            self._line_start = True

    def _draw(self, lines: Sequence[str]) -> None:
        if not self._line_start:
            return  # another writer is mid-line: draw at the next tick
        width = max(20, shutil.get_terminal_size((120, 24)).columns - 1)
        self._clear()
        self._block = [line[:width] for line in lines]
        self.stream.write("".join(line + "\n" for line in self._block))
        self.stream.flush()
        self._drawn = len(self._block)

    def _clear(self) -> None:
        if self._drawn:
            # Back to the block's first line, then erase to the end of the screen.
            self.stream.write(f"\x1b[{self._drawn}F\x1b[J")
            self.stream.flush()
            self._drawn = 0

    def write_through(self, target: Any, text: str) -> int:
        """Write another writer's ``text`` to ``target`` above the block (which is redrawn at
        the next tick)."""
        with self._lock:
            self._clear()
            n = target.write(text)
            if text:
                self._line_start = text.endswith("\n")
            return n

    def close(self) -> None:
        """Erase the terminal block (the sweep's final report follows)."""
        with self._lock:
            self._clear()
            self._block = []


class _Through:
    """``sys.stdout``/``sys.stderr`` while the terminal block is up: writes go above it."""

    def __init__(self, display: ProgressDisplay, target: Any) -> None:
        self._display = display
        self._target = target

    def write(self, text: str) -> int:
        return self._display.write_through(self._target, text)

    def flush(self) -> None:
        self._target.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target, name)


_ACTIVE: ProgressDisplay | None = None


def active_display() -> ProgressDisplay | None:
    """The display of the sweep running in this process (None outside :func:`live_progress`)."""
    return _ACTIVE


def note_front(size: int, hypervolume: float | None) -> None:
    """Tell the running sweep's display about the current front (no-op without one)."""
    display = _ACTIVE
    if display is not None:
        display.set_front(size, hypervolume)


@contextlib.contextmanager
def live_progress(n_trials: int, stream: Any = None) -> Iterator[ProgressDisplay]:
    """The progress display for the duration of ``tuner.fit()``.

    On a terminal, ``sys.stdout``, ``sys.stderr`` and logging handlers writing to them go
    through the display, so other output appears above the redrawn block instead of inside it;
    all is restored on exit, whatever happened.
    """
    global _ACTIVE
    display = ProgressDisplay(n_trials, stream=stream if stream is not None else sys.stdout)
    swapped: list[tuple[logging.StreamHandler, Any]] = []
    saved = (sys.stdout, sys.stderr)
    if display.tty:
        proxies = {id(s): _Through(display, s) for s in saved}
        sys.stdout, sys.stderr = proxies[id(saved[0])], proxies[id(saved[1])]
        loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                           if isinstance(lg, logging.Logger)]
        for logger in loggers:
            for handler in logger.handlers:
                if isinstance(handler, logging.StreamHandler) and id(handler.stream) in proxies:
                    swapped.append((handler, handler.stream))
                    handler.setStream(proxies[id(handler.stream)])
    _ACTIVE = display
    try:
        yield display
    finally:
        _ACTIVE = None
        display.close()
        for handler, stream in swapped:
            handler.setStream(stream)
        if display.tty:
            sys.stdout, sys.stderr = saved


# ---------------------------------------------------------------------------------------------
# The board (a Ray actor) and the driver's Tune callback
# ---------------------------------------------------------------------------------------------


class BoardReader:
    """Turns the board's states into new records for :meth:`ProgressDisplay.update`: each epoch
    record once (a retried trial, with another ``run``, starts over), a live record when it
    changed."""

    def __init__(self) -> None:
        self._printed: dict[str, tuple[float, int]] = {}  # trial -> (run, last epoch printed)
        self._live: dict[str, tuple[Any, Any]] = {}  # trial -> (run, elapsed) of the last live record

    def records(self, states: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for trial, state in states.items():
            live = state.get("live") or {}
            run = float(live.get("run", 0.0))
            seen_run, seen_epoch = self._printed.get(trial, (run, 0))
            if seen_run != run:
                seen_epoch = 0
            for record in state.get("epochs") or []:
                if int(record.get("epoch", 0)) > seen_epoch:
                    out.append(dict(record))
                    seen_epoch = int(record["epoch"])
            self._printed[trial] = (run, seen_epoch)
            version = (live.get("run"), live.get("elapsed_s"))
            if live and self._live.get(trial) != version:  # news only
                self._live[trial] = version
                out.append(dict(live))
        return out


def _counts(trials: Iterable[Any]) -> tuple[int, int, int]:
    finished = failed = running = 0
    for t in trials:
        status = getattr(t, "status", None)
        finished += status == "TERMINATED"
        failed += status == "ERROR"
        running += status == "RUNNING"
    return finished, failed, running


def make_progress_callback(board: str, n_trials: int) -> Any:
    """A Ray Tune callback that feeds :func:`active_display` from the sweep's board ``board``
    (see :func:`board_name`) and Tune's trial list. Holds only strings and numbers when pickled
    into Tune's experiment state, so a resumed sweep restores it."""
    from ray.tune import Callback

    class ProgressCallback(Callback):
        """Reads the progress board from Tune's loop every :data:`POLL_S` (a few small reads of
        the cluster's store), keeps the display's counts and prints a status when one is due;
        takes a trial's last records when it ends, before its end line."""

        def __init__(self, board: str, n_trials: int) -> None:
            self.board = board
            self.n_trials = n_trials
            self._reader = BoardReader()
            self._next_poll = 0.0

        def __getstate__(self) -> dict[str, Any]:
            return {"board": self.board, "n_trials": self.n_trials}

        def __setstate__(self, state: dict[str, Any]) -> None:
            self.__init__(state["board"], state["n_trials"])

        def _read(self, display: ProgressDisplay, trial_id: str | None = None) -> None:
            try:
                display.update(self._reader.records(fetch(self.board, trial_id)))
            except Exception as exc:  # progress must never stop the sweep
                log.debug("progress board: %s", exc)

        def on_step_end(self, iteration: int, trials: list[Any], **info: Any) -> None:
            display = active_display()
            if display is None:
                return
            now = time.monotonic()
            if now >= self._next_poll:
                self._next_poll = now + POLL_S
                self._read(display)
            display.set_counts(*_counts(trials))
            display.tick()

        def _ended(self, trial: Any) -> None:
            display = active_display()
            if display is not None:
                self._read(display, trial.trial_id)  # its last epoch lines before its end line
                display.trial_ended(trial.trial_id)
            try:
                forget(self.board, trial.trial_id)
            except Exception as exc:
                log.debug("progress board: %s", exc)

        def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            self._ended(trial)

        def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            self._ended(trial)

        def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
            try:
                forget(self.board)
            except Exception as exc:
                log.debug("progress board: %s", exc)

    return ProgressCallback(board, n_trials)


def __getattr__(name: str) -> Any:
    # The trial side is a Lightning callback (search/trials/progress.py); the driver, which
    # imports this module, never loads Lightning for it.
    if name in ("TrialProgress", "trial_progress"):
        from search.trials import progress as trial_side

        return getattr(trial_side, name)
    raise AttributeError(f"module 'search.progress' has no attribute {name!r}")

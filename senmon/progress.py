"""Progress bars for long work (downloads, extraction, training), drawn with tqdm, only where someone watches.

`enabled()` is the one decision: bars are on when stderr is a terminal (and TERM is not 'dumb');
`SENMON_PROGRESS=1` or `=0` forces them on or off. Logs, CI and pytest output therefore get the
printed summary lines and no bar noise. The process that owns the terminal decides; work that
runs elsewhere is told, never guesses (a Ray worker's stderr is a log file).

Training runs in Ray Train workers, whose output reaches the driver only with `ray.log_to_driver`,
which senmon keeps off by default. `ray.experimental.tqdm_ray` sends its bars' states over that
same log stream, so here it would draw nothing. Instead the driver opens a `Relay`: a small actor
(the board) that each run's rank 0 posts its latest bar state to, at most every `INTERVAL_S`, and
a thread in the driver that draws those states as tqdm bars. A job carries the board's handle in
its config: no board, no bar (`training_progress`). `TrainingProgress` is what the training loop
feeds each step. It keeps to its interval and formats the line: step/total, elapsed and ETA come
from tqdm; loss, tokens seen and tokens/s follow them.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
import uuid
from typing import IO, Callable, Iterable, Mapping

from tqdm import tqdm

ENV = "SENMON_PROGRESS"
INTERVAL_S = 0.5  # a bar's state is sent (and drawn) at most this often
# tqdm's default less its steps/s (the postfix's tokens/s says more): `law:  45%|███▌  | 42/93 [00:02<00:02, loss ...]`
TRAINING_BAR = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]"

State = dict  # {"desc": str, "total": int, "step": int, "postfix": str, "closed": bool}


def enabled(stream: IO | None = None, environ: Mapping[str, str] | None = None) -> bool:
    """Whether to draw bars on `stream` (default stderr): `$SENMON_PROGRESS` if set, else whether it is a terminal."""
    environ = os.environ if environ is None else environ
    forced = environ.get(ENV, "").strip().lower()
    if forced in ("1", "true", "yes", "on"):
        return True
    if forced in ("0", "false", "no", "off"):
        return False
    stream = sys.stderr if stream is None else stream
    try:
        terminal = stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False
    return bool(terminal) and environ.get("TERM") != "dumb"


def bar(iterable: Iterable | None = None, *, file: IO | None = None, **options) -> tqdm:
    """A tqdm bar on `file` (default stderr) that draws only when `enabled(file)`; options as tqdm takes them."""
    file = sys.stderr if file is None else file
    return tqdm(iterable, file=file, disable=not enabled(file), dynamic_ncols=True, **options)


def _count(value: float) -> str:
    return f"{value:.0f}" if value < 1000 else tqdm.format_sizeof(value)


def training_postfix(tokens: float, loss: float, tokens_per_s: float) -> str:
    """What follows tqdm's own step/total, elapsed<ETA and steps/s on a training bar."""
    shown = f"{loss:.3f}" if math.isfinite(loss) else str(loss)
    return f"loss {shown}, {_count(tokens)} tokens, {_count(tokens_per_s)} tokens/s"


class TrainingProgress:
    """Fed by the training loop every step; hands the bar's state to `emit(key, state)` at most every
    `interval_s`, and once more on `close()`. `workers` scales tokens and tokens/s from one worker to the job."""

    def __init__(self, emit: Callable[[str, State], None], desc: str, total: int, workers: int = 1,
                 interval_s: float = INTERVAL_S):
        self.emit, self.workers, self.interval_s = emit, workers, interval_s
        self.key = f"{desc}-{uuid.uuid4().hex[:8]}"
        self.state: State = {"desc": desc, "total": total, "step": 0, "postfix": "", "closed": False}
        self.sent_at = -math.inf

    def update(self, step: int, tokens: int, loss: float, tokens_per_s: float) -> None:
        self.state.update(step=step, postfix=training_postfix(tokens * self.workers, loss, tokens_per_s * self.workers))
        now = time.monotonic()
        if now - self.sent_at >= self.interval_s:
            self.sent_at = now
            self.emit(self.key, dict(self.state))

    def close(self) -> None:
        if not self.state["closed"]:
            self.state["closed"] = True
            self.emit(self.key, dict(self.state))


class Display:
    """Draws bar states on `file` as tqdm bars, one per key; a closed state closes its bar (its last line stays)."""

    def __init__(self, file: IO | None = None):
        self.file = sys.stderr if file is None else file
        self.bars: dict[str, tqdm] = {}

    def show(self, key: str, state: State) -> None:
        bar = self.bars.get(key)
        if bar is None:  # each state is drawn as it comes (the sender keeps the pace); the ETA from the next one
            bar = self.bars[key] = tqdm(total=state["total"], initial=state["step"], desc=state["desc"], unit="step",
                                        file=self.file, dynamic_ncols=True, mininterval=0, miniters=1, disable=False,
                                        bar_format=TRAINING_BAR)
        bar.set_postfix_str(state["postfix"], refresh=False)
        if state["step"] > bar.n:
            bar.update(state["step"] - bar.n)
        else:
            bar.refresh()
        if state["closed"]:
            bar.close()
            del self.bars[key]

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()


class _Board:
    """The relay's actor: the latest state of each bar since the driver last took them."""

    def __init__(self):
        self.states: dict[str, State] = {}

    def post(self, key: str, state: State) -> None:
        self.states[key] = state

    def take(self) -> dict[str, State]:
        states, self.states = self.states, {}
        return states


class Relay:
    """Driver side: bars for work that runs in Ray workers (see the module docstring).

    `with Relay() as relay:` starts the board and the drawing thread when `enabled(file)` (or `on`);
    pass `relay.board` to the job (None when bars are off). `relay.wrap(say)` prints around the bars.
    """

    def __init__(self, file: IO | None = None, on: bool | None = None, interval_s: float = INTERVAL_S):
        self.file = sys.stderr if file is None else file
        self.on = enabled(self.file) if on is None else on
        self.interval_s = interval_s
        self.board = None
        self.display = Display(self.file)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "Relay":
        if self.on:
            import ray

            self.board = ray.remote(num_cpus=0)(_Board).remote()
            self._thread = threading.Thread(target=self._draw, name="senmon-progress", daemon=True)
            self._thread.start()
        return self

    def _draw(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._poll()

    def _poll(self) -> None:
        import ray

        try:
            states = ray.get(self.board.take.remote(), timeout=10)
        except Exception:  # a progress bar is never worth failing or stalling the work for
            return
        for key, state in states.items():
            self.display.show(key, state)

    def wrap(self, say: Callable[[str], None]) -> Callable[[str], None]:
        """`say`, clearing the bars while it prints and drawing them again after."""
        if not self.on:
            return say

        def said(message: str) -> None:
            with tqdm.external_write_mode():
                say(message)

        return said

    def __exit__(self, *exc) -> None:
        if self._thread is None:
            return
        import ray

        self._stop.set()
        self._thread.join()
        self._poll()  # the last states (a closed bar's final line)
        self.display.close()
        try:
            ray.kill(self.board)
        except Exception:  # Ray already gone: so is the board
            pass
        self.board, self._thread = None, None


def training_progress(board, desc: str, total: int, workers: int = 1) -> TrainingProgress | None:
    """In a Ray worker: the training bar posting to the driver's relay `board`; None (no bar) without one."""
    if board is None:
        return None

    def emit(key: str, state: State) -> None:
        posted = board.post.remote(key, state)
        if state["closed"]:  # the last state is on the board before the job returns and the driver takes it
            import ray

            try:
                ray.get(posted, timeout=5)
            except Exception:  # the driver and its board are gone: no bar to finish
                pass

    return TrainingProgress(emit, desc, total, workers)

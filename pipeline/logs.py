"""Progress of long loops and the library noise filtered out of the logs, in one place.

* `progress_bar(iterable=None, total=..., desc=...)`: a tqdm bar with ETA on a terminal; in a log file
  (stderr not a tty) a line at every 10% instead ("[warm-start policy] 40% (200/500), 0:42 elapsed, ETA 1:03"),
  so a log holds a handful of lines per loop, not thousands of carriage-return frames.
  `attach_progress(trainer, desc)` does the same for a transformers `Trainer` (its own tqdm turned off).
* `say(stage, message)`: one line of a stage's progress, `[stage] message`, from the main process only; every
  stage reports through it (the orchestrator's own plan and status lines go through its logger).
* `quiet_library_noise()`: drops messages a user cannot act on (DeepSpeed's "Setting accelerator to CPU"
  on every CPU run, bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community"), and
  in a log file turns off the model-loading and datasets progress bars (frozen at 0% in a log).
"""

from __future__ import annotations

import logging
import os
import sys
import time


# (logger name, message prefix): library messages that say nothing a user can act on.
_NOISE = (
    ("DeepSpeed", "Setting accelerator to CPU."),
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward"),
)


def say(stage: str, message: str) -> None:
    """Print `[stage] message` on stdout (flushed) from the main process (RANK 0 or a single process) only:
    the one way a stage reports progress, so N processes do not print N copies of every line."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[{stage}] {message}", flush=True)


QUIET_SECONDS = 10.0  # a loop shorter than this prints only its 100% line in a log file


def is_tty(stream=None) -> bool:
    stream = sys.stderr if stream is None else stream
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def clock(seconds: float) -> str:
    """H:MM:SS, or M:SS under an hour."""
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def human_bytes(n: float) -> str:
    """'512 B', '1.5 KB', ..., '2.0 TB' (powers of 1024)."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


class LineProgress:
    """tqdm's update/set_postfix/close/iteration, printing one line per `every` of the total (non-tty)."""

    def __init__(
        self, iterable=None, total=None, desc="", initial=0, every=0.1, stream=None, disable=False, min_seconds=None
    ):
        self.min_seconds = QUIET_SECONDS if min_seconds is None else min_seconds
        self.printed = False
        self.iterable = iterable
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.desc, self.n, self.every, self.disable = desc, initial, every, disable
        self.stream = stream
        self.start, self.start_n = time.monotonic(), initial
        self.postfix = ""
        self._next = self._threshold_after(initial)

    def _threshold_after(self, n: int) -> int | None:
        if not self.total or n >= self.total:
            return None
        step = max(1, round(self.total * self.every))
        return min(self.total, (n // step + 1) * step)

    def line(self) -> str:
        elapsed = time.monotonic() - self.start
        done = self.n - self.start_n
        text = f"[{self.desc}] {100 * self.n / self.total:.0f}% ({self.n}/{self.total}), {clock(elapsed)} elapsed"
        if done > 0 and self.n < self.total:
            text += f", ETA {clock(elapsed / done * (self.total - self.n))}"
        return text + (f" ({self.postfix})" if self.postfix else "")

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.disable or self._next is None or self.n < self._next:
            return
        self._next = self._threshold_after(self.n)
        if not self.printed and time.monotonic() - self.start < self.min_seconds and self._next is not None:
            return  # a loop done within seconds needs no progress lines
        print(self.line(), file=self.stream or sys.stderr, flush=True)
        self.printed = True

    def set_postfix(self, **kw) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in kw.items())

    def close(self) -> None:
        pass

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def progress_bar(iterable=None, *, total=None, desc="", initial=0, disable=False, stream=None, min_seconds=None):
    """A tqdm bar (terminal) or sparse percentage lines (log file: one per 10%, none for a loop done within
    `min_seconds`, default QUIET_SECONDS, except its last); same interface either way."""
    if is_tty(stream):
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, initial=initial, disable=disable, file=stream)
    return LineProgress(
        iterable, total=total, desc=desc, initial=initial, disable=disable, stream=stream, min_seconds=min_seconds
    )


def trainer_progress_callback(desc: str):
    """A `TrainerCallback` showing the optimizer steps through `progress_bar` on the main process (for a
    Trainer whose own tqdm bar is off: `disable_tqdm=True`)."""
    from transformers import TrainerCallback

    class ProgressLinesCallback(TrainerCallback):
        def __init__(self):
            self.bar = None

        def on_train_begin(self, args, state, control, **kw):
            if state.is_world_process_zero:
                self.bar = progress_bar(total=state.max_steps, desc=desc, initial=state.global_step)

        def on_step_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kw):
            if self.bar is not None and logs and "loss" in logs:
                self.bar.set_postfix(loss=f"{float(logs['loss']):.4g}")

        def on_train_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    return ProgressLinesCallback()


def quiet_library_noise() -> None:
    """Filter the messages in `_NOISE` and, when stderr is not a terminal, the libraries' own progress bars.
    Idempotent; called once by `pipeline.run.main` before any stage imports the libraries."""
    for name, prefix in _NOISE:
        logger = logging.getLogger(name)
        if not any(getattr(f, "_pipeline_noise", None) == prefix for f in logger.filters):
            flt = logging.Filter()
            flt.filter = lambda record, p=prefix: not str(record.getMessage()).startswith(p)  # type: ignore[method-assign]
            flt._pipeline_noise = prefix  # type: ignore[attr-defined]
            logger.addFilter(flt)
    if not is_tty():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # "Loading weights" bars, frozen at 0% in a log file
        except ImportError:  # pragma: no cover
            pass
        try:
            import datasets

            datasets.disable_progress_bars()
        except ImportError:  # pragma: no cover
            pass


def attach_progress(trainer, desc: str) -> None:
    """Show a Trainer's optimizer steps through `progress_bar` (its own tqdm must be off: disable_tqdm=True).
    In a log file the per-logging-step metric dicts are not printed as well (they are in the trainer's log
    history / train_log.json, and the latest loss is on every progress line)."""
    trainer.add_callback(trainer_progress_callback(desc))
    if not is_tty():
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)

"""Training metrics: JSON lines (+ TensorBoard), a progress bar and a tokens/s timer.

`MetricsWriter(workdir)` appends one JSON object per `write` to
`<workdir>/metrics.jsonl`:

    {"step": 120, "split": "train", "time": 1718000000.5, "loss": 2.31, ...}

Non-finite values are the strings "nan", "inf" and "-inf", so every line is
valid JSON; `read_metrics(workdir)` turns them back into floats. With
tensorboardX, or else the `tensorboard` package, installed, the same scalars go
to `<workdir>/tensorboard/` under the tags `<split>/<name>`.

A run resumed from a checkpoint appends to the same file and re-writes the
steps after the checkpoint that the killed run may already have written;
`read_metrics` keeps the newer timeline (see its docstring), and the
TensorBoard events of the killed run from the first step written on resume on
are purged (a SessionLog START event, as tensorboardX's `purge_step`).
"""

from __future__ import annotations

import importlib
import json
import math
import operator
import os
import sys
import time
import warnings
from typing import Any, Callable, Mapping, TextIO

import jax
import numpy as np

from jaxlin import validation

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
RESERVED_KEYS = ("step", "split", "time")
TENSORBOARD_OPTIONS = ("auto", "tensorboardX", "tensorboard")
# the modules each TensorBoard backend imports, in the order "auto" tries them
_BACKEND_MODULES = {
    "tensorboardX": ("tensorboardX",),
    "tensorboard": (
        "tensorboard.summary.writer.event_file_writer",
        "tensorboard.compat.proto.event_pb2",
        "tensorboard.compat.proto.summary_pb2",
    ),
}
_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


# ----------------------------------------------------------------- JSON lines


def _to_number(name: str, value: Any) -> int | float:
  """A metric as a Python int (integer or bool dtypes) or float."""
  if isinstance(value, (int, float)):
    return int(value) if isinstance(value, int) else float(value)
  array = np.asarray(value)
  if array.size != 1:
    raise ValueError(f"metric {name!r} must be a scalar, got shape {array.shape}")
  if array.dtype.kind in "biu":
    return int(array.reshape(()))
  if array.dtype.kind not in "f":
    raise TypeError(f"metric {name!r} must be a number, got {array.dtype}")
  return float(array.reshape(()))


def _encode(number: int | float) -> int | float | str:
  """`number`, or its string when it is NaN or +-Inf."""
  if isinstance(number, float) and not math.isfinite(number):
    return "nan" if math.isnan(number) else ("inf" if number > 0 else "-inf")
  return number


def _decode(record: dict[str, Any]) -> dict[str, Any]:
  """`record` with the strings "nan" / "inf" / "-inf" of its metrics as floats."""
  return {
      key: _NONFINITE.get(value, value)
      if key not in RESERVED_KEYS and isinstance(value, str) else value
      for key, value in record.items()
  }


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """The records of `<workdir>/metrics.jsonl`, oldest first.

  A run resumed from a checkpoint re-writes the steps after it, so records are
  deduplicated: of several records with the same (split, step) only the last
  one written is kept; and when a split's step goes back below the highest
  step written so far (a restart from an earlier checkpoint), the earlier
  records of every split at that step or later, from the abandoned run, are
  dropped. Unparsable lines (a write torn by a killed process) are skipped
  with a warning.
  """
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"no metrics file {path}")
  kept: dict[tuple[str, int], dict[str, Any]] = {}
  top: dict[str, int] = {}  # highest kept step per split
  bad = 0
  with open(path, encoding="utf-8") as f:
    for line in f:
      if not line.strip():
        continue
      try:
        record = json.loads(line)
        split, step = record["split"], record["step"]
        if not isinstance(split, str) or not isinstance(step, int):
          raise TypeError
      except (ValueError, KeyError, TypeError):
        bad += 1
        continue
      if step < top.get(split, step):  # a restart: drop the abandoned steps
        kept = {k: r for k, r in kept.items() if k[1] < step}
        top = {}
        for s, t in kept:
          top[s] = max(top.get(s, t), t)
      kept.pop((split, step), None)  # re-insert at the end: file order
      kept[(split, step)] = _decode(record)
      top[split] = max(top.get(split, step), step)
  if bad:
    warnings.warn(f"skipped {bad} unparsable line(s) in {path}", stacklevel=2)
  return list(kept.values())


# ----------------------------------------------------------------- TensorBoard


def _import_backend(name: str) -> list[Any] | None:
  """The modules of TensorBoard backend `name`, or None when not installed."""
  try:
    return [importlib.import_module(module) for module in _BACKEND_MODULES[name]]
  except ImportError:
    return None


def _resolve_tensorboard(option: bool | str) -> tuple[str, list[Any]] | None:
  """(backend name, its modules) for the `tensorboard` option, or None."""
  if option is False:
    return None
  if option is True or option == "auto":
    for name in _BACKEND_MODULES:
      modules = _import_backend(name)
      if modules is not None:
        return name, modules
    if option is True:
      raise ImportError(
          "tensorboard=True needs tensorboardX or tensorboard: "
          "pip install tensorboardX (or tensorboard), or pass tensorboard=False")
    return None
  validation.require(option in _BACKEND_MODULES, "tensorboard", option,
                     f"a bool or one of {TENSORBOARD_OPTIONS}")
  modules = _import_backend(option)
  if modules is None:
    raise ImportError(f"tensorboard={option!r} but {option} is not installed: "
                      f"pip install {option}")
  return option, modules


class _TensorBoard:
  """Scalar events in `logdir`, by tensorboardX or by the tensorboard package."""

  def __init__(self, logdir: str, backend: str, modules: list[Any],
               purge_step: int | None) -> None:
    self.backend = backend
    # tensorboardX names files by the second only: a restart within the same
    # second would overwrite the file; nanoseconds keep them apart and in order
    suffix = f".{time.time_ns()}"
    if backend == "tensorboardX":
      self._writer = modules[0].SummaryWriter(
          logdir, purge_step=purge_step, filename_suffix=suffix)
      return
    event_file_writer, self._event_pb2, self._summary_pb2 = modules
    self._writer = event_file_writer.EventFileWriter(logdir, filename_suffix=suffix)
    if purge_step is not None:  # TensorBoard drops older events at >= step
      start = self._event_pb2.SessionLog(status=self._event_pb2.SessionLog.START)
      self._writer.add_event(self._event_pb2.Event(
          wall_time=time.time(), step=purge_step, session_log=start))

  def scalars(self, step: int, values: Mapping[str, float], wall_time: float) -> None:
    """Writes `values` (tag -> number) at `step` and flushes."""
    if self.backend == "tensorboardX":
      for tag, value in values.items():
        self._writer.add_scalar(tag, value, step, walltime=wall_time)
    else:
      summary = self._summary_pb2.Summary(value=[
          self._summary_pb2.Summary.Value(tag=tag, simple_value=value)
          for tag, value in values.items()
      ])
      self._writer.add_event(
          self._event_pb2.Event(wall_time=wall_time, step=step, summary=summary))
    self._writer.flush()

  def close(self) -> None:
    """Flushes and closes the event file."""
    self._writer.close()


# ----------------------------------------------------------------- the writer


class MetricsWriter:
  """Appends metrics records to `<workdir>/metrics.jsonl` (+ TensorBoard).

  `tensorboard`: "auto" (default) writes events when tensorboardX or the
  tensorboard package is installed; True requires one; False disables;
  "tensorboardX" / "tensorboard" picks the backend. `backend` says which is
  used (None for none). Every write is flushed.
  """

  def __init__(self, workdir: str, *, tensorboard: bool | str = "auto") -> None:
    resolved = _resolve_tensorboard(tensorboard)
    os.makedirs(workdir, exist_ok=True)
    self.workdir = workdir
    self.path = os.path.join(workdir, METRICS_FILE)
    self.resumed = os.path.exists(self.path) and os.path.getsize(self.path) > 0
    torn = False
    if self.resumed:  # a killed run may have left half a line
      with open(self.path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        torn = f.read(1) != b"\n"
    self._file: TextIO | None = open(self.path, "a", encoding="utf-8")
    if torn:
      self._file.write("\n")
      self._file.flush()
    self.backend = resolved[0] if resolved else None
    self._tb_modules = resolved[1] if resolved else None
    self._tb: _TensorBoard | None = None  # opened on the first write

  def write(self, step: int, metrics: Mapping[str, Any], *, split: str) -> None:
    """Appends the record of `metrics` (name -> scalar) at `step` of `split`."""
    if self._file is None:
      raise ValueError("MetricsWriter is closed")
    validation.require(isinstance(split, str) and bool(split) and "/" not in split, "split",
                       split, "a non-empty name without '/'")
    step = operator.index(step)
    clash = sorted(set(metrics) & set(RESERVED_KEYS))
    if clash:
      raise ValueError(f"metric names {clash} are reserved: {RESERVED_KEYS}")
    values = {str(name): _to_number(name, value) for name, value in metrics.items()}
    now = time.time()
    record = {"step": step, "split": split, "time": now}
    record.update((name, _encode(value)) for name, value in values.items())
    self._file.write(json.dumps(record, allow_nan=False) + "\n")
    self._file.flush()
    if self._tb_modules is not None:
      if self._tb is None:
        self._tb = _TensorBoard(
            os.path.join(self.workdir, TENSORBOARD_DIR), self.backend,
            self._tb_modules, purge_step=step if self.resumed else None)
      self._tb.scalars(
          step, {f"{split}/{name}": float(v) for name, v in values.items()}, now)

  def close(self) -> None:
    """Closes the files; a second call does nothing."""
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self) -> MetricsWriter:
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.close()


# ----------------------------------------------------------------- formatting


def format_number(x: float) -> str:
  """A short human number: 950, 4.1k, 12k, 1.2M, 3.4G; "nan" / "inf" as such."""
  x = float(x)
  if not math.isfinite(x):
    return str(x)
  sign = "-" if x < 0 else ""
  x = abs(x)
  for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
    if round(x / scale, 1) >= 1:
      scaled = x / scale
      return f"{sign}{scaled:.1f}{unit}" if scaled < 9.95 else f"{sign}{scaled:.0f}{unit}"
  return f"{sign}{x:.0f}" if x >= 10 else f"{sign}{x:.2g}"


def format_duration(seconds: float) -> str:
  """A short duration: 45s, 3m12s, 1h05m, 2d03h; "?" when unknown."""
  if not math.isfinite(seconds) or seconds < 0:
    return "?"
  s = int(round(seconds))
  if s < 60:
    return f"{s}s"
  if s < 3600:
    return f"{s // 60}m{s % 60:02d}s"
  if s < 86400:
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
  return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _format_value(value: Any) -> str:
  """An extra progress-bar value: numbers to 4 significant digits."""
  if isinstance(value, (bool, int, np.integer)):
    return str(int(value))
  try:
    return f"{float(value):.4g}"
  except (TypeError, ValueError):
    return str(value)


# ----------------------------------------------------------------- progress


def _default_enabled() -> bool:
  """Only the first process of a multi-host run draws a bar."""
  return jax.process_index() == 0


class ProgressBar:
  """A one-line progress bar: `step 120/2000 [==>   ] 6% loss 2.314 tok/s 4.1k eta 3m12s`.

  On a TTY the line is redrawn with "\\r"; otherwise (logs, CI) a plain line is
  printed for the first update, then at most every `min_interval_s` seconds,
  and always for the last step (or, at `close`, for the last update if it was
  not printed). The ETA uses the rate measured from the first update on (that
  update follows the first step, which compiles, so compilation does not count; a
  resumed run gets a sane one too); until a second update it shows "?". `enabled=None` draws on
  process 0 only; `stream=None` is sys.stderr.
  """

  def __init__(self, total_steps: int, *, initial_step: int = 0,
               stream: TextIO | None = None, enabled: bool | None = None,
               min_interval_s: float = 10.0, width: int = 20,
               clock: Callable[[], float] = time.monotonic) -> None:
    validation.require(total_steps > 0, "total_steps", total_steps, "a number > 0")
    self.total_steps = total_steps
    self.initial_step = initial_step
    self.stream = sys.stderr if stream is None else stream
    self.enabled = _default_enabled() if enabled is None else enabled
    self.min_interval_s = min_interval_s
    self.width = width
    self._clock = clock
    self._first: tuple[float, int] | None = None   # (time, step) of the first update
    self._last_print = -math.inf
    self._pending: str | None = None  # the last line not printed (non-TTY)
    self._drawn = 0  # length of the line on screen (TTY)
    try:
      self.tty = bool(self.stream.isatty())
    except (AttributeError, ValueError):
      self.tty = False

  def line(self, step: int, *, loss: float, tokens_per_second: float,
           **extra: Any) -> str:
    """The progress line for `step` (no drawing)."""
    frac = min(max(step / self.total_steps, 0.0), 1.0)
    filled = int(frac * self.width)
    bar = "=" * filled + (">" if filled < self.width else "")
    bar = bar.ljust(self.width)
    eta = math.nan
    if self._first is not None:
      done = step - self._first[1]
      elapsed = self._clock() - self._first[0]
      if done > 0 and elapsed > 0:
        eta = (self.total_steps - step) * elapsed / done
    if step >= self.total_steps:
      eta = 0.0
    parts = [f"step {step}/{self.total_steps} [{bar}] {int(frac * 100)}%",
             f"loss {_format_value(loss)}",
             f"tok/s {format_number(tokens_per_second)}"]
    parts += [f"{name} {_format_value(value)}" for name, value in extra.items()]
    parts.append(f"eta {format_duration(eta)}")
    return " ".join(parts)

  def update(self, step: int, *, loss: float, tokens_per_second: float,
             **extra: Any) -> None:
    """Shows `step` with its loss, tokens/s and `extra` name/value pairs."""
    if not self.enabled:
      return
    if self._first is None:
      self._first = (self._clock(), step)
    text = self.line(step, loss=loss, tokens_per_second=tokens_per_second, **extra)
    if self.tty:
      self.stream.write("\r" + text.ljust(self._drawn))
      self._drawn = len(text)
      self.stream.flush()
      return
    now = self._clock()
    if step >= self.total_steps or now - self._last_print >= self.min_interval_s:
      self._print(text, now)
    else:
      self._pending = text

  def _print(self, text: str, now: float) -> None:
    """Prints a plain line (non-TTY)."""
    self.stream.write(text + "\n")
    self.stream.flush()
    self._last_print = now
    self._pending = None

  def close(self) -> None:
    """Ends the line (TTY) or prints the last update if it was skipped."""
    if not self.enabled:
      return
    if self.tty and self._drawn:
      self.stream.write("\n")
      self.stream.flush()
      self._drawn = 0
    elif self._pending is not None:
      self._print(self._pending, self._clock())

  def __enter__(self) -> ProgressBar:
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.close()


# ----------------------------------------------------------------- timing


class StepTimer:
  """Tokens per second between log points.

  Call `tick(tokens)` after each train step's call returns and `lap()` at a
  log point once the step's metrics are on the host (that synchronizes the
  device; jax dispatch is asynchronous). With `skip_first`, the first tick
  (whose call traces and compiles the step) restarts the clock and its tokens
  are not counted.
  """

  def __init__(self, *, skip_first: bool = False,
               clock: Callable[[], float] = time.perf_counter) -> None:
    self._clock = clock
    self._skip = skip_first
    self._start = clock()
    self._tokens = 0
    self.steps = 0  # counted since the last lap

  def tick(self, tokens: int) -> None:
    """Counts one finished step of `tokens` tokens."""
    if self._skip:
      self._skip = False
      self._start = self._clock()
      return
    self._tokens += int(tokens)
    self.steps += 1

  def lap(self) -> float:
    """Tokens/s since the previous lap (or the start); NaN when nothing was counted."""
    now = self._clock()
    elapsed = now - self._start
    rate = self._tokens / elapsed if self._tokens and elapsed > 0 else math.nan
    self._start, self._tokens, self.steps = now, 0, 0
    return rate

"""Loss curves of a run: `plot_losses(workdir)` writes `<workdir>/loss.png`.

Reads `jaxlin.training.metrics.read_metrics(workdir)`: train loss (faint, with an EMA
smoothed line), eval loss (markers) and, when recorded, eval accuracy on a
second y axis. Drawn with the Agg canvas directly, so matplotlib's global
backend (pyplot) is left alone. Also `python -m jaxlin.training.plot WORKDIR [OUT]`.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from jaxlin.training.metrics import read_metrics

LOG_Y_RATIO = 10.0  # log y axis when max / min of the losses exceeds this


def _series(records: list[dict[str, Any]], split: str,
            key: str) -> tuple[list[int], list[float]]:
  """(steps, values) of the finite `key` values of `split`, by step."""
  points = sorted(
      (r["step"], float(r[key])) for r in records
      if r["split"] == split and isinstance(r.get(key), (int, float))
      and math.isfinite(r[key]))
  return [s for s, _ in points], [v for _, v in points]


def ema(values: list[float], decay: float) -> list[float]:
  """Bias-corrected exponential moving average (as TensorBoard's smoothing)."""
  out, avg = [], 0.0
  for i, v in enumerate(values, 1):
    avg = decay * avg + (1 - decay) * v
    out.append(avg / (1 - decay**i))
  return out


def plot_losses(workdir: str, *, out: str | None = None,
                size_px: tuple[int, int] = (1000, 600), dpi: int = 100,
                smoothing: float = 0.9) -> str:
  """Writes the loss plot of `workdir` (default `<workdir>/loss.png`); returns its path.

  `size_px` is the image size (width, height) in pixels; `smoothing` the EMA
  decay of the train-loss line per point for a 200-point series (scaled so a
  shorter or longer series is smoothed over the same fraction of the run). Raises ValueError when there is nothing finite
  to plot (no "loss" and no eval "accuracy").
  """
  records = read_metrics(workdir)
  train = _series(records, "train", "loss")
  valid = _series(records, "eval", "loss")
  accuracy = _series(records, "eval", "accuracy")
  if not (train[0] or valid[0] or accuracy[0]):
    raise ValueError(f"no finite 'loss' or eval 'accuracy' to plot in {workdir}")
  out = os.path.join(workdir, "loss.png") if out is None else out

  fig = Figure(figsize=(size_px[0] / dpi, size_px[1] / dpi), dpi=dpi,
               layout="constrained")
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  handles = []
  if train[0]:
    ax.plot(*train, color="tab:blue", alpha=0.25, linewidth=1)
    # the same smoothing over the same fraction of a run however often it logged:
    # `smoothing` is the decay per point at 200 points
    decay = smoothing ** (200 / max(len(train[1]), 1))
    handles += ax.plot(train[0], ema(train[1], decay), color="tab:blue",
                       linewidth=1.8, label="train loss (smoothed)")
  if valid[0]:
    handles += ax.plot(*valid, color="tab:orange", marker="o", markersize=4,
                       linewidth=1, label="eval loss")
  losses = train[1] + valid[1]
  if losses and min(losses) > 0 and max(losses) / min(losses) > LOG_Y_RATIO:
    ax.set_yscale("log")
  ax.set_xlabel("step")
  ax.set_ylabel("loss")
  ax.grid(True, alpha=0.3)
  if accuracy[0]:
    ax2 = ax.twinx()
    handles += ax2.plot(*accuracy, color="tab:green", marker="s", markersize=4,
                        linewidth=1, label="eval accuracy")
    ax2.set_ylabel("accuracy")
  ax.legend(handles=handles, loc="best")
  ax.set_title(os.path.basename(os.path.normpath(os.path.abspath(workdir))))

  parent = os.path.dirname(os.path.abspath(out))
  os.makedirs(parent, exist_ok=True)
  fig.savefig(out, format="png")
  return out


if __name__ == "__main__":
  if len(sys.argv) not in (2, 3):
    sys.exit("usage: python -m jaxlin.training.plot WORKDIR [OUT]")
  print(plot_losses(sys.argv[1], out=sys.argv[2] if len(sys.argv) == 3 else None))

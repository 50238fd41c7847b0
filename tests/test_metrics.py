"""Tests of `jaxlin.training.metrics` (JSON lines, TensorBoard, progress bar, timer) and `jaxlin.training.plot`."""
from __future__ import annotations

import glob
import io
import json
import math
import os
import sys

import numpy as np
import pytest

from jaxlin.training import metrics
from jaxlin.training.metrics import MetricsWriter, ProgressBar, StepTimer, read_metrics


class FakeClock:
  """A settable clock for the progress bar and the timer."""

  def __init__(self) -> None:
    self.t = 100.0

  def __call__(self) -> float:
    return self.t


def _no_tensorboard(monkeypatch: pytest.MonkeyPatch) -> None:
  """Makes both TensorBoard backends unimportable."""
  names = ["tensorboardX", "tensorboard"]
  for modules in metrics._BACKEND_MODULES.values():
    names += modules
  for name in names:
    monkeypatch.setitem(sys.modules, name, None)


def _scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
  """tag -> [(step, value)] as TensorBoard reads them (with its restart purging)."""
  from tensorboard.backend.event_processing import event_accumulator
  acc = event_accumulator.EventAccumulator(logdir)
  acc.Reload()
  return {tag: [(e.step, e.value) for e in acc.Scalars(tag)]
          for tag in acc.Tags()["scalars"]}


# ----------------------------------------------------------------- JSON lines


def test_jsonl_round_trip_with_nonfinite(tmp_path):
  with MetricsWriter(str(tmp_path), tensorboard=False) as w:
    assert w.backend is None
    w.write(1, {"loss": np.float32(2.5), "lr": 1e-3, "tokens": np.int64(4096)},
            split="train")
    w.write(2, {"loss": float("nan"), "grad_norm": float("inf"), "x": -math.inf},
            split="train")
    w.write(2, {"loss": 2.25, "accuracy": 0.5}, split="eval")
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  raw = [json.loads(line) for line in lines]  # strict JSON, every line
  assert raw[1]["loss"] == "nan" and raw[1]["grad_norm"] == "inf" and raw[1]["x"] == "-inf"
  assert list(raw[0])[:3] == ["step", "split", "time"]
  assert type(raw[0]["loss"]) is float and raw[0]["tokens"] == 4096
  assert not (tmp_path / "tensorboard").exists()

  recs = read_metrics(str(tmp_path))
  assert [(r["split"], r["step"]) for r in recs] == [("train", 1), ("train", 2), ("eval", 2)]
  assert recs[0]["loss"] == 2.5 and recs[0]["lr"] == 1e-3
  assert math.isnan(recs[1]["loss"]) and recs[1]["grad_norm"] == math.inf
  assert recs[1]["x"] == -math.inf
  assert recs[2] == {**raw[2], "loss": 2.25, "accuracy": 0.5}
  assert abs(recs[0]["time"] - raw[0]["time"]) < 1e-9


def test_write_validation(tmp_path):
  w = MetricsWriter(str(tmp_path), tensorboard=False)
  with pytest.raises(ValueError, match="reserved"):
    w.write(1, {"step": 3.0}, split="train")
  with pytest.raises(ValueError, match="scalar"):
    w.write(1, {"loss": np.ones(3)}, split="train")
  with pytest.raises(ValueError, match="split"):
    w.write(1, {"loss": 1.0}, split="")
  w.close()
  w.close()  # idempotent
  with pytest.raises(ValueError, match="closed"):
    w.write(1, {"loss": 1.0}, split="train")
  with pytest.raises(FileNotFoundError):
    read_metrics(str(tmp_path / "missing"))


def test_resume_appends_and_keeps_last_record_per_step(tmp_path):
  d = str(tmp_path)
  with MetricsWriter(d, tensorboard=False) as w:  # the run killed at step 70
    for step in range(10, 80, 10):
      w.write(step, {"loss": 1.0}, split="train")
    w.write(40, {"loss": 1.5}, split="eval")
    w.write(60, {"loss": 1.25}, split="eval")
  with open(os.path.join(d, "metrics.jsonl"), "a") as f:
    f.write('{"step": 80, "split": "tr')  # a write torn by the kill
  with MetricsWriter(d, tensorboard=False) as w:  # restart from the step-50 checkpoint
    assert w.resumed
    for step in range(60, 110, 10):
      w.write(step, {"loss": 2.0}, split="train")
    w.write(80, {"loss": 2.5}, split="eval")
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert len(lines) == 7 + 2 + 1 + 5 + 1  # appended; the torn line is ended
  with pytest.warns(UserWarning, match="1 unparsable"):
    recs = read_metrics(d)
  train = [(r["step"], r["loss"]) for r in recs if r["split"] == "train"]
  assert train == [(10, 1.0), (20, 1.0), (30, 1.0), (40, 1.0), (50, 1.0),
                   (60, 2.0), (70, 2.0), (80, 2.0), (90, 2.0), (100, 2.0)]
  # the killed run's eval at 60 (after the checkpoint) is gone, the one at 40 stays
  evals = [(r["step"], r["loss"]) for r in recs if r["split"] == "eval"]
  assert evals == [(40, 1.5), (80, 2.5)]
  assert len({(r["split"], r["step"]) for r in recs}) == len(recs)


def test_same_step_rewritten_keeps_last(tmp_path):
  d = str(tmp_path)
  with MetricsWriter(d, tensorboard=False) as w:
    w.write(5, {"loss": 1.0}, split="train")
    w.write(5, {"loss": 3.0}, split="eval")
    w.write(5, {"loss": 0.5}, split="eval")
    w.write(6, {"loss": 0.9}, split="train")
  recs = read_metrics(d)
  assert [(r["split"], r["step"], r["loss"]) for r in recs] == [
      ("train", 5, 1.0), ("eval", 5, 0.5), ("train", 6, 0.9)]


# ----------------------------------------------------------------- TensorBoard


@pytest.mark.parametrize("backend", ["tensorboardX", "tensorboard"])
def test_tensorboard_events(tmp_path, backend):
  d = str(tmp_path)
  with MetricsWriter(d, tensorboard=backend) as w:
    assert w.backend == backend
    for step in (1, 2, 3):
      w.write(step, {"loss": 4.0 - step, "lr": 0.1 * step}, split="train")
    w.write(3, {"loss": 1.5}, split="eval")
  assert glob.glob(os.path.join(d, "tensorboard", "events.out.tfevents.*"))
  got = _scalars(os.path.join(d, "tensorboard"))
  assert sorted(got) == ["eval/loss", "train/loss", "train/lr"]
  assert got["train/loss"] == [(1, 3.0), (2, 2.0), (3, 1.0)]
  assert [s for s, _ in got["train/lr"]] == [1, 2, 3]
  np.testing.assert_allclose([v for _, v in got["train/lr"]], [0.1, 0.2, 0.3], rtol=1e-6)
  assert got["eval/loss"] == [(3, 1.5)]

  # a restart from step 1 purges the killed run's events from step 2 on
  with MetricsWriter(d, tensorboard=backend) as w:
    w.write(2, {"loss": 7.0}, split="train")
  got = _scalars(os.path.join(d, "tensorboard"))
  assert got["train/loss"] == [(1, 3.0), (2, 7.0)]


def test_tensorboard_auto_prefers_tensorboardx(tmp_path):
  with MetricsWriter(str(tmp_path)) as w:
    assert w.backend == "tensorboardX"


def test_tensorboard_missing(tmp_path, monkeypatch):
  _no_tensorboard(monkeypatch)
  with pytest.raises(ImportError, match="pip install tensorboardX"):
    MetricsWriter(str(tmp_path / "a"), tensorboard=True)
  with pytest.raises(ImportError, match="not installed"):
    MetricsWriter(str(tmp_path / "a"), tensorboard="tensorboard")
  with pytest.raises(ValueError, match="tensorboard: got .*; expected a bool or one of"):
    MetricsWriter(str(tmp_path / "a"), tensorboard="tf")
  with MetricsWriter(str(tmp_path / "b")) as w:  # "auto": JSON lines only
    assert w.backend is None
    w.write(1, {"loss": 1.0}, split="train")
  assert not (tmp_path / "b" / "tensorboard").exists()
  assert read_metrics(str(tmp_path / "b"))[0]["loss"] == 1.0


# ----------------------------------------------------------------- progress bar


def test_format_helpers():
  fn, fd = metrics.format_number, metrics.format_duration
  assert [fn(x) for x in (0, 0.5, 12, 950, 4100, 12345, 1.23e6, 3.4e9, -2500)] == [
      "0", "0.5", "12", "950", "4.1k", "12k", "1.2M", "3.4G", "-2.5k"]
  assert fn(999.97) == "1.0k" and fn(float("nan")) == "nan"
  assert [fd(x) for x in (0, 45, 192, 3900, 2 * 86400 + 3 * 3600)] == [
      "0s", "45s", "3m12s", "1h05m", "2d03h"]
  assert fd(float("nan")) == "?"


def test_progress_bar_line():
  clock = FakeClock()
  bar = ProgressBar(2000, stream=io.StringIO(), enabled=True, width=10, clock=clock)
  clock.t += 40.0  # the first step compiles: not counted
  assert bar.line(1, loss=2.5, tokens_per_second=0.0).endswith("eta ?")
  bar.update(1, loss=2.5, tokens_per_second=0.0)
  clock.t += 23.8  # 119 more steps in 23.8 s -> 1880 left take 376 s
  line = bar.line(120, loss=2.3141, tokens_per_second=4100.0)
  assert line == "step 120/2000 [>         ] 6% loss 2.314 tok/s 4.1k eta 6m16s"


def test_progress_bar_non_tty_throttled():
  clock, stream = FakeClock(), io.StringIO()
  bar = ProgressBar(100, initial_step=50, stream=stream, enabled=True, clock=clock)
  assert not bar.tty
  for step in range(51, 101):
    clock.t += 1.0  # a step a second: 50 s in all, a line every 10 s
    bar.update(step, loss=1.0 + 1 / step, tokens_per_second=2.5e6, lr=3e-4)
  bar.close()
  lines = stream.getvalue().splitlines()
  assert "\r" not in stream.getvalue()
  steps = [int(line.split()[1].split("/")[0]) for line in lines]
  assert steps == [51, 61, 71, 81, 91, 100]
  assert all("loss " in line and "tok/s 2.5M" in line and "lr 0.0003" in line
             for line in lines)
  assert lines[-1].startswith("step 100/100 [====================] 100%")
  assert lines[-1].endswith("eta 0s")


def test_progress_bar_close_prints_pending_and_eta_from_the_first_update():
  clock, stream = FakeClock(), io.StringIO()
  bar = ProgressBar(1000, initial_step=500, stream=stream, enabled=True, clock=clock)
  clock.t += 30.0
  bar.update(510, loss=2.0, tokens_per_second=1.0)  # first update: printed, no rate yet
  clock.t += 2.0
  bar.update(520, loss=1.5, tokens_per_second=1.0)  # throttled, printed at close
  bar.close()
  lines = stream.getvalue().splitlines()
  assert len(lines) == 2 and lines[1].startswith("step 520/1000")
  assert lines[0].endswith("eta ?")
  assert lines[1].endswith("eta 1m36s")  # 10 steps / 2 s after the first update, 480 left


def test_progress_bar_tty_and_disabled():
  class Tty(io.StringIO):
    def isatty(self) -> bool:
      return True

  clock, stream = FakeClock(), Tty()
  with ProgressBar(10, stream=stream, enabled=True, clock=clock) as bar:
    for step in range(1, 11):
      clock.t += 0.1
      bar.update(step, loss=float(step), tokens_per_second=1.0)
  out = stream.getvalue()
  assert out.count("\r") == 10 and out.endswith("\n") and out.count("\n") == 1

  assert ProgressBar(10, stream=io.StringIO()).enabled  # process 0 of 1

  quiet = io.StringIO()
  with ProgressBar(10, stream=quiet, enabled=False) as bar:
    bar.update(10, loss=1.0, tokens_per_second=1.0)
  assert quiet.getvalue() == ""


def test_step_timer():
  clock = FakeClock()
  timer = StepTimer(skip_first=True, clock=clock)
  clock.t += 30.0  # the compile step
  timer.tick(1000)
  for _ in range(4):
    clock.t += 0.5
    timer.tick(1000)
  assert timer.steps == 4
  assert timer.lap() == pytest.approx(2000.0)
  assert math.isnan(timer.lap())  # nothing since
  clock.t += 2.0
  timer.tick(500)
  assert timer.lap() == pytest.approx(250.0)
  plain = StepTimer(clock=clock)
  clock.t += 4.0
  plain.tick(100)
  assert plain.lap() == pytest.approx(25.0)


# ----------------------------------------------------------------- plot


def test_plot_losses_png(tmp_path):
  from matplotlib.image import imread
  from jaxlin.training.plot import plot_losses

  d = str(tmp_path / "run1")
  with MetricsWriter(d, tensorboard=False) as w:
    for step in range(1, 201):
      loss = 10.0 * math.exp(-step / 40) + 0.5
      w.write(step, {"loss": float("nan") if step == 50 else loss}, split="train")
      if step % 50 == 0:
        w.write(step, {"loss": loss + 0.1, "accuracy": step / 250}, split="eval")
  path = plot_losses(d, size_px=(640, 480))
  assert path == os.path.join(d, "loss.png")
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert imread(path).shape[:2] == (480, 640)

  other = str(tmp_path / "plots" / "x.png")
  assert plot_losses(d, out=other) == other
  assert imread(other).shape[:2] == (600, 1000)


def test_plot_losses_errors_without_metrics(tmp_path):
  from jaxlin.training.plot import plot_losses

  d = str(tmp_path)
  with MetricsWriter(d, tensorboard=False) as w:
    w.write(1, {"loss": float("nan"), "lr": 0.1}, split="train")
  with pytest.raises(ValueError, match="no finite 'loss'"):
    plot_losses(d)
  assert not os.path.exists(os.path.join(d, "loss.png"))
  with pytest.raises(FileNotFoundError, match="no metrics file"):
    plot_losses(str(tmp_path / "empty"))

"""`python run.py` as a user runs it (subprocesses): train, files, sampling, SIGTERM + resume."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from _train_helpers import checkpoint_params, train_losses

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.data.seq_len=32", "--config.data.batch_size=8", "--config.model.d_model=32",
        "--config.model.num_layers=2", "--config.model.pattern=LN", "--config.model.mlp_hidden=64",
        "--config.model.expert_hidden=32", "--config.optimizer.warmup_steps=2",
        "--config.eval.num_batches=2", "--config.logging.every_steps=1",
        "--config.sample.max_new_tokens=24", "--config.logging.tensorboard=False"]


def _run(workdir: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
  command = [sys.executable, os.path.join(REPO, "run.py"), "--config",
             os.path.join(REPO, "configs", "default.py"), f"--config.workdir={workdir}", *TINY,
             *args]
  return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow  # ~1.5-2 min: two subprocesses, each importing jax and compiling
def test_train_then_sample_from_the_checkpoint(tmp_path) -> None:
  workdir = str(tmp_path)
  done = _run(workdir, "--config.train.num_steps=12", "--config.checkpoint.every_steps=6",
              "--config.eval.every_steps=6", "--config.optimizer.learning_rate=0.01")
  assert done.returncode == 0, done.stderr[-3000:]
  losses = train_losses(workdir)
  assert sorted(losses) == list(range(1, 13))
  assert np.mean([losses[s] for s in (10, 11, 12)]) < losses[1] - 0.5  # from ~5.5 (ln 256)
  evals = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))
           if '"eval"' in l]
  assert [e["step"] for e in evals] == [6, 12] and evals[1]["loss"] < evals[0]["loss"]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["12", "6"]
  with open(os.path.join(workdir, "loss.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert "===== sample 0 =====\nROMEO." in done.stdout
  assert "step 12/12" in done.stderr  # the progress bar's last line

  sampled = _run(workdir, "--mode=sample", "--prompt=KING.", "--config.sample.num_samples=3")
  assert sampled.returncode == 0, sampled.stderr[-3000:]
  assert sampled.stdout.count("===== step 12 sample") == 3
  assert sampled.stdout.count("KING.") >= 3
  reseeded = _run(workdir, "--mode=sample", "--prompt=KING.", "--config.sample.num_samples=3",
                  "--seed=7")
  assert reseeded.returncode == 0, reseeded.stderr[-3000:]
  assert reseeded.stdout.count("===== step 12 sample") == 3
  assert reseeded.stdout != sampled.stdout     # --seed changes the samples


def test_sample_without_a_checkpoint_says_so(tmp_path) -> None:
  sampled = _run(str(tmp_path), "--mode=sample")
  assert sampled.returncode != 0 and "no checkpoint in" in sampled.stderr


@pytest.mark.slow
def test_sigterm_then_rerun_matches_a_straight_run(tmp_path) -> None:
  """N steps in one go == SIGTERM midway (an external signal) + the same command again."""
  steps = ["--config.train.num_steps=40", "--config.checkpoint.every_steps=0",
           "--config.eval.every_steps=0", "--config.sample.num_samples=0"]
  straight = str(tmp_path / "straight")
  assert _run(straight, *steps).returncode == 0
  killed = str(tmp_path / "killed")
  command = [sys.executable, os.path.join(REPO, "run.py"), "--config",
             os.path.join(REPO, "configs", "default.py"), f"--config.workdir={killed}", *TINY,
             *steps]
  process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
  metrics = os.path.join(killed, "metrics.jsonl")
  deadline = time.time() + 240
  while time.time() < deadline and process.poll() is None:
    if os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= 5:
      process.send_signal(signal.SIGTERM)
      break
    time.sleep(0.05)
  _, stderr = process.communicate(timeout=240)
  assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
  stopped_at = int(sorted(os.listdir(os.path.join(killed, "checkpoints")), key=int)[-1])
  assert 5 <= stopped_at < 40
  resumed = _run(killed, *steps)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"resumed from the checkpoint at step {stopped_at}" in resumed.stderr
  assert train_losses(killed) == train_losses(straight)
  for a, b in zip(checkpoint_params(killed, 40), checkpoint_params(straight, 40)):
    np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------ user errors and help
def _error_lines(stderr: str) -> list[str]:
  """stderr without the log records (`<date> <time> LEVEL ...`)."""
  return [l for l in stderr.splitlines() if l.strip() and not l[:4].isdigit()]


@pytest.mark.parametrize("args, message", [
    (["--config.train.num_stepz=5"],
     "default.py has no field 'train.num_stepz'; did "
     "you mean 'train.num_steps'?"),
    (["--config.model.linear_variant=glaa"],
     "error: model.linear_variant: got 'glaa'; expected one of ("),
    (["--config.optimizer.warmup_steps=100", "--config.train.num_steps=50"],
     "for this run try --config.optimizer.warmup_steps=5 (10%)"),
    (["--config.data.source=text", "--config.data.paths=/no/such/file.txt"],
     "error: data.paths='/no/such/file.txt': no such file"),
    (["--seed=3"], "error: --seed=3: only for --mode=sample"),
    (["--step=5"], "error: --step: got 5; expected no value: "),
])
def test_a_user_error_is_one_line_and_exit_2(tmp_path, args: list[str], message: str) -> None:
  workdir = str(tmp_path / "run")
  done = _run(workdir, *args, timeout=120)
  lines = _error_lines(done.stderr)
  assert done.returncode == 2, done.stderr[-3000:]
  assert "Traceback" not in done.stderr and len(lines) == 2, done.stderr
  assert message in lines[0]
  assert not os.path.exists(workdir)        # a failed start leaves no work directory


def test_debug_shows_the_traceback(tmp_path) -> None:
  done = _run(str(tmp_path / "run"), "--config.model.linear_variant=glaa", "--debug", timeout=120)
  assert done.returncode == 1 and "Traceback (most recent call last)" in done.stderr
  assert "ValueError: model.linear_variant: got 'glaa'" in done.stderr


def test_help_exits_0_and_no_arguments_suggest_a_config() -> None:
  run_py = os.path.join(REPO, "run.py")
  shown = subprocess.run([sys.executable, run_py, "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
  assert shown.returncode == 0 and "--mode" in shown.stdout and "fields" in shown.stdout
  bare = subprocess.run([sys.executable, run_py], cwd=REPO, capture_output=True, text=True,
                        timeout=60)
  assert bare.returncode == 2 and "try: python run.py --config configs/default.py" in bare.stderr


def test_fields_mode_lists_every_field_with_its_comment(tmp_path) -> None:
  done = _run(str(tmp_path), "--mode=fields", timeout=120)
  assert done.returncode == 0, done.stderr[-3000:]
  lines = done.stdout.splitlines()
  by_path = {l.split(" = ")[0]: l for l in lines}
  assert "train.num_steps" in by_path and "model.mom_core" in by_path and "optimizer.b2" in by_path
  assert by_path["train.num_steps"].endswith("# optimizer steps (the cosine schedule ends here)")
  assert "# a key of jaxlin.layers.linear_attention.VARIANTS" in by_path["model.linear_variant"]
  assert "# AdamW second-moment decay" in by_path["optimizer.b2"]
  assert by_path["model.d_model"].startswith("model.d_model = 32")   # the overridden value
  assert not os.listdir(str(tmp_path))         # listing fields writes nothing


def _raised(fn) -> BaseException:
  try:
    fn()
  except BaseException as error:  # noqa: BLE001 - the test inspects it
    return error
  raise AssertionError("nothing raised")


def test_only_the_repositorys_own_checks_are_user_errors() -> None:
  """A config check's ValueError is a user error (one line); a ValueError from a library
  deep inside a computation, or another exception type, is a bug and keeps its traceback."""
  from jaxlin import validation
  from jaxlin.training import cli
  assert cli.is_user_error(_raised(lambda: validation.fail("model.d_model", 0, "an int >= 1")))
  assert not cli.is_user_error(_raised(lambda: np.zeros(3).reshape(2)))
  assert not cli.is_user_error(TypeError("not raised"))

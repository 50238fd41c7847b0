"""Two processes on one machine (jax.distributed with a localhost coordinator, CPU gloo
collectives) train the default config as run.py does: each process reads its own documents, the
global batch is assembled from process-local rows, both write the orbax checkpoints, only
process 0 writes metrics; resuming from an earlier checkpoint reproduces the losses exactly.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from test_run import REPO, TINY

pytestmark = pytest.mark.slow   # ~2 min: two 2-process runs, each process compiling


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _run_two_processes(workdir: str, *args: str) -> list[subprocess.CompletedProcess]:
  port = _free_port()
  command = [sys.executable, os.path.join(REPO, "run.py"), "--config",
             os.path.join(REPO, "configs", "default.py"), f"--config.workdir={workdir}", *TINY,
             "--config.train.num_steps=4", "--config.checkpoint.every_steps=2",
             "--config.eval.every_steps=2", "--config.sample.num_samples=0",
             "--config.logging.progress=False",
             f"--config.distributed.coordinator_address=localhost:{port}",
             "--config.distributed.num_processes=2", *args]
  processes = [subprocess.Popen(command + [f"--config.distributed.process_id={i}"], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for i in range(2)]
  done = []
  for p in processes:
    out, err = p.communicate(timeout=300)
    done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
  return done


def _records(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_two_processes_train_checkpoint_and_resume_exactly(tmp_path) -> None:
  workdir = str(tmp_path / "run")
  first = _run_two_processes(workdir)
  assert all(p.returncode == 0 for p in first), first[0].stderr[-3000:] + first[1].stderr[-3000:]
  assert "2 devices (data 2)" in first[0].stderr and "process 1 of 2" in first[1].stderr
  straight = {r["step"]: r["loss"] for r in _records(workdir) if r["split"] == "train"}
  assert sorted(straight) == [1, 2, 3, 4]            # process 0 alone writes the metrics
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]

  again = _run_two_processes(workdir, "--step=2")    # resume from checkpoint 2: steps 3, 4
  assert all(p.returncode == 0 for p in again), again[0].stderr[-3000:]
  assert "resumed from the checkpoint at step 2" in again[0].stderr
  resumed = [r for r in _records(workdir) if r["split"] == "train"][4:]
  assert {r["step"]: r["loss"] for r in resumed} == {3: straight[3], 4: straight[4]}

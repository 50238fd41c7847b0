"""The train loop in-process: steps, optimizer, resume, signals, errors (tiny model, CPU)."""
from __future__ import annotations

import math
import os
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from _train_helpers import checkpoint_params, tiny_config, train_losses
from jaxlin.training import optim, steps, train
from jaxlin.training.checkpoint import CheckpointCorruptError, CheckpointMismatchError
from jaxlin.training.metrics import read_metrics
from jaxlin.config import ModelConfig


def _model_config(**overrides: object) -> ModelConfig:
  return ModelConfig.preset("tiny", **{"d_model": 32, "num_layers": 2, "pattern": "LN",
                                       **overrides})


def _batch(B: int = 4, T: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  segment_ids = np.repeat(np.array([[1] * (T // 2) + [2] * (T - T // 2)]), B, axis=0)
  weights = (segment_ids[:, :-1] == segment_ids[:, 1:]).astype(np.float32)
  return dict(inputs=rng.integers(0, 256, (B, T)).astype(np.int32),
              targets=rng.integers(0, 256, (B, T)).astype(np.int32),
              segment_ids=segment_ids.astype(np.int32),
              weights=np.concatenate([weights, np.zeros((B, 1), np.float32)], axis=1))


# ---------------------------------------------------------------- optimizer
def test_schedule_warmup_then_cosine_to_end_value() -> None:
  config = optim.default_config()
  config.update(learning_rate=1e-3, end_learning_rate=1e-4, warmup_steps=10)
  schedule = optim.learning_rate_schedule(config, 110)
  assert float(schedule(0)) == 0.0
  assert float(schedule(5)) == pytest.approx(5e-4)
  assert float(schedule(10)) == pytest.approx(1e-3)
  # halfway through the cosine: end + (peak - end) * (1 + cos(pi / 2)) / 2
  assert float(schedule(60)) == pytest.approx(1e-4 + 9e-4 * 0.5, rel=1e-5)
  assert float(schedule(110)) == pytest.approx(1e-4)


def test_decay_mask_spares_norms_biases_and_gates() -> None:
  config = _model_config(linear_variant="gated_deltanet", pattern="L", num_layers=1, moe_every=0)
  _, params = steps.init_params(config, 0)
  flat = {"/".join(str(getattr(k, "key", k)) for k in path): decays for path, decays in
          jax.tree_util.tree_flatten_with_path(optim.decay_mask(params))[0]}
  assert flat["embedding"] and flat["blocks/0/mixer/q_proj/kernel"]
  assert flat["blocks/0/mlp/w_up"]
  assert not flat["blocks/0/mixer_norm/weight"] and not flat["final_norm/weight"]
  gate_leaves = [k for k in flat if "/gate/" in k]
  assert gate_leaves and not any(flat[k] for k in gate_leaves)  # A_log, dt_bias, gate proj


@pytest.mark.parametrize("field,value,match", [
    ("learning_rate", 0.0, "optimizer.learning_rate"),
    ("warmup_steps", 100, r"optimizer.warmup_steps: got 100; expected an int in \[0, train.num_steps"),
    ("b2", 1.0, "optimizer.b2"),
])
def test_optimizer_config_errors_name_the_field(field: str, value: float, match: str) -> None:
  config = optim.default_config()
  config[field] = value
  with pytest.raises(ValueError, match=match):
    optim.make_optimizer(config, 100 if field == "warmup_steps" else 1000)


# ---------------------------------------------------------------- the step
def test_loss_is_the_weighted_mean_cross_entropy() -> None:
  config = _model_config(moe_every=0)
  graphdef, params = steps.init_params(config, 0)
  batch = _batch()
  ce_sum, correct, _ = jax.jit(steps.forward, static_argnums=0)(graphdef, params, batch)
  logits, _, _ = jax.jit(lambda p, b: nnx.merge(graphdef, p)(
      b["inputs"], segment_ids=b["segment_ids"]))(params, batch)
  logits = np.asarray(logits, np.float64)
  log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  picked = np.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]
  np.testing.assert_allclose(float(ce_sum), np.sum((log_z - picked) * batch["weights"]), rtol=1e-5)
  hits = (logits.argmax(-1) == batch["targets"]) * batch["weights"]
  assert float(correct) == hits.sum()


@pytest.mark.slow   # CI step 2; the default run keeps the single-batch training tests
def test_gradient_accumulation_matches_one_big_batch() -> None:
  config = _model_config(moe_every=0)  # no aux losses: the objectives are identical
  graphdef, params = steps.init_params(config, 0)
  tx, schedule = optax.sgd(0.5), optax.constant_schedule(0.5)  # the update is linear in the grads
  batch = _batch(B=4)
  results = []
  for accumulation in (1, 2):
    state = steps.TrainState(jnp.int32(0), params, tx.init(params))
    step = jax.jit(steps.make_train_step(graphdef, tx, schedule, accumulation))
    results.append(step(state, batch))
  (one, m1), (two, m2) = results
  assert float(m1["loss"]) == pytest.approx(float(m2["loss"]), rel=1e-6)
  assert float(m1["grad_norm"]) == pytest.approx(float(m2["grad_norm"]), rel=1e-5)
  for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(two.params)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  assert not np.allclose(jax.tree.leaves(one.params)[0], jax.tree.leaves(params)[0])


# ---------------------------------------------------------------- the run
def _eval_steps(workdir: str) -> list[int]:
  return [r["step"] for r in read_metrics(workdir) if r["split"] == "eval"]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, train.TrainResult]:
  workdir = str(tmp_path_factory.mktemp("straight"))
  return workdir, train.train(tiny_config(workdir))


def test_run_writes_metrics_checkpoints_plot_and_samples(straight_run) -> None:
  workdir, result = straight_run
  assert result.final_step == 8 and result.interrupted is None
  losses = train_losses(workdir)
  assert sorted(losses) == list(range(1, 9))
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "8"]
  for name in ("metrics.jsonl", "loss.png", "samples.txt", "config.json"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  assert result.samples and result.samples[0].startswith("ROMEO.")
  assert set(result.last_eval) == {"loss", "perplexity", "accuracy"}
  assert result.last_eval["perplexity"] == pytest.approx(math.exp(result.last_eval["loss"]))


@pytest.mark.slow   # CI step 2 (about 70 s on 2 cores)
def test_resume_after_sigterm_is_exact(straight_run, tmp_path, monkeypatch) -> None:
  """8 steps in one go == SIGTERM after step 6 (checkpoint; step 4's is on disk too) + a
  second run to step 8, which must resume from the newest checkpoint."""
  straight_dir, _ = straight_run
  workdir = str(tmp_path)
  original = train._device_batches

  def batches_then_sigterm(*args, **kwargs):
    for count, batch in enumerate(original(*args, **kwargs), start=1):
      if count == 6:
        os.kill(os.getpid(), signal.SIGTERM)  # the handler records it; step 6 still runs
      yield batch

  monkeypatch.setattr(train, "_device_batches", batches_then_sigterm)
  every_2 = {"eval.every_steps": 2}   # an eval is due at step 6, where the signal stops it
  first = train.train(tiny_config(workdir, **every_2))
  monkeypatch.setattr(train, "_device_batches", original)
  assert first.interrupted == "SIGTERM" and first.final_step == 6
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "6"]
  assert _eval_steps(workdir) == [2, 4]
  second = train.train(tiny_config(workdir, **every_2))
  assert second.start_step == 6 and second.final_step == 8
  assert _eval_steps(workdir) == [2, 4, 6, 8]   # step 6's eval is done after the resume
  assert train_losses(workdir) == train_losses(straight_dir)  # bit-identical floats
  for a, b in zip(checkpoint_params(workdir, 8), checkpoint_params(straight_dir, 8)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_mismatched_config_is_refused_and_checkpoints_kept(straight_run, tmp_path) -> None:
  straight_dir, _ = straight_run
  workdir = str(tmp_path / "copy")
  shutil.copytree(straight_dir, workdir)
  before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  with pytest.raises(CheckpointMismatchError, match=r"(?s)q_proj/kernel: checkpoint \(32, 32\), "
                     r"config \(48, 48\).*model.d_model: checkpoint 32, config 48"):
    train.train(tiny_config(workdir, **{"model.d_model": 48}))
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before


@pytest.mark.slow
def test_corrupt_checkpoint_gives_a_clear_error(straight_run, tmp_path) -> None:
  straight_dir, _ = straight_run
  workdir = str(tmp_path / "copy")
  shutil.copytree(straight_dir, workdir)
  params_dir = os.path.join(workdir, "checkpoints", "8", "params")
  for root, _, files in os.walk(params_dir):  # damage every stored file of the newest step
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"\0garbage")
  longer = {"train.num_steps": 12}
  with pytest.raises(CheckpointCorruptError, match=r"checkpoint step 8 .* cannot be read.*"
                     r"Rerun with --step=4 "):
    train.train(tiny_config(workdir, **longer))
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "8"]
  # the offered step works: step 8 is moved aside (kept), the run resumes from 4
  with pytest.raises(ValueError, match=r"--step: got 5; expected a saved checkpoint step .*\[4, 8\]"):
    train.train(tiny_config(workdir, **longer), restore_step=5)
  result = train.train(tiny_config(workdir, **longer), restore_step=4)
  assert result.start_step == 4 and result.final_step == 12
  assert os.listdir(os.path.join(workdir, "checkpoints_set_aside")) == ["8"]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["12", "4", "8"]
  # step 5's loss is taken before its update: step 4's parameters on step 5's batch (the
  # longer run's schedule changes the updates from there on)
  assert train_losses(workdir)[5] == train_losses(straight_dir)[5]


@pytest.mark.slow   # CI step 2
def test_non_finite_loss_stops_with_step_and_metric(tmp_path, monkeypatch) -> None:
  # NaN enters through the embedding of a softmax-only dense model: on jax 0.10.2, XLA:CPU
  # segfaults in the backward pass of the chunked GLA op when its per-key gates are NaN (fine on
  # jax 0.12); see the closing note of issue 4.
  init_params = steps.init_params

  def nan_embedding(*args, **kwargs):
    graphdef, params = init_params(*args, **kwargs)
    return graphdef, dict(params, embedding=params["embedding"] * jnp.nan)

  monkeypatch.setattr(steps, "init_params", nan_embedding)
  with pytest.raises(train.NonFiniteError, match=r"step 1: non-finite .*loss=nan.*last "
                                                 r"checkpoint: step None"):
    train.train(tiny_config(str(tmp_path), **{"model.pattern": "N", "model.moe_every": 0}))
  assert not os.path.exists(os.path.join(str(tmp_path), "checkpoints", "1"))


@pytest.mark.parametrize("key,value,match", [
    ("train.num_steps", 0, r"train.num_steps: got 0; expected an int >= 1"),
    ("data.batch_size", 6, r"data.batch_size: got 6; expected a multiple of train.accumulation_steps"),
    ("checkpoint.max_to_keep", 0, r"checkpoint.max_to_keep: got 0"),
    ("logging.tensorboard", "yes", r"logging.tensorboard: got 'yes'"),
])
def test_run_config_errors_name_the_field(tmp_path, key: str, value: object, match: str) -> None:
  overrides = {key: value}
  if key == "data.batch_size":
    overrides["train.accumulation_steps"] = 4
  with pytest.raises(ValueError, match=match):
    train.train(tiny_config(str(tmp_path), **overrides))


def test_chunked_cross_entropy_equals_the_whole_one_with_gradients() -> None:
  """The loss over 4 chunks of 16 positions (remat per chunk) = over all 64 at once: the sums
  and the gradients of the hidden states and the head."""
  rng = np.random.RandomState(0)
  h = jnp.asarray(rng.normal(size=(3, 64, 8)), jnp.float32)
  head = jnp.asarray(rng.normal(size=(8, 50)), jnp.float32)
  targets = jnp.asarray(rng.randint(0, 50, size=(3, 64)))
  weights = jnp.asarray(rng.randint(0, 2, size=(3, 64)), jnp.float32)

  def whole(h, head):
    return steps.weighted_cross_entropy(jnp.matmul(h, head), targets, weights)

  def chunked(h, head):
    return steps.chunked_cross_entropy(h, head, targets, weights, chunk=16)

  for a, b in zip(whole(h, head), chunked(h, head)):
    np.testing.assert_allclose(float(a), float(b), rtol=1e-6)
  grads = [jax.grad(lambda h, w, f=f: f(h, w)[0], argnums=(0, 1))(h, head)
           for f in (whole, chunked)]
  for a, b in zip(*grads):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)

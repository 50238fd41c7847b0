"""`jaxlin.training.train.train(config)`: the training run behind `python run.py --config configs/X.py`.

    data (grain) -> jitted train_step (donated state) -> metrics.jsonl / TensorBoard / progress
                 -> eval every eval.every_steps -> checkpoint every checkpoint.every_steps
    end: final eval, checkpoint, loss.png, text samples (samples.txt)

Resuming: a work directory with a checkpoint continues from its newest step
(`restore_step`: from that one; the newer checkpoints are moved to
`<workdir>/checkpoints_set_aside`) with the same parameters, optimizer state and data
position, so N steps in one go and N/2 + N/2 across a restart give the same losses and
parameters. An eval that was due at the resumed step and is missing from metrics.jsonl
(a signal stopped the run there) is done first. A run that fails before its first
checkpoint or metrics record removes the work directory it created.
SIGTERM / SIGINT finish the current step, save a checkpoint and return
(`TrainResult.interrupted` names the signal; a second SIGINT aborts at once).
A non-finite metric raises `NonFiniteError` naming the step and the metric;
no checkpoint of that state is written.

The config fields are documented in configs/default.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import signal
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from jaxlin import data as data_lib
from jaxlin import validation
from jaxlin.training import metrics as metrics_lib
from jaxlin.training import optim, placement, plot, pretrained, sample, steps
from jaxlin.training.checkpoint import Checkpointer

log = logging.getLogger("jaxlin")


class NonFiniteError(FloatingPointError):
  """A training metric became NaN or Inf."""


@dataclasses.dataclass
class TrainResult:
  """What a call to `train` did."""
  workdir: str
  start_step: int                       # the step it resumed from (0: a fresh run)
  final_step: int                       # the step it stopped at
  last_train: dict[str, float]          # the last logged train metrics
  last_eval: dict[str, float]           # the last evaluation (loss, perplexity, accuracy)
  interrupted: str | None = None        # "SIGTERM" / "SIGINT" when a signal stopped it
  samples: list[str] = dataclasses.field(default_factory=list)


# ---------------------------------------------------------------- configuration
def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks the run-level fields (data / model / optimizer check their own)."""
  validation.require(isinstance(config.workdir, str) and config.workdir != "", "workdir", config.workdir,
           "a directory path (set --config.workdir=...)")
  validation.require(validation.is_int(config.seed), "seed", config.seed, "an int")
  t, c, e, g = config.train, config.checkpoint, config.eval, config.logging
  validation.require(validation.is_int(t.num_steps) and t.num_steps >= 1, "train.num_steps", t.num_steps, "an int >= 1")
  validation.require(validation.is_int(t.accumulation_steps) and t.accumulation_steps >= 1,
           "train.accumulation_steps", t.accumulation_steps, "an int >= 1")
  validation.require(validation.is_int(c.every_steps) and c.every_steps >= 0, "checkpoint.every_steps",
           c.every_steps, "an int >= 0 (0: only at the end and on a signal)")
  validation.require(validation.is_int(c.max_to_keep) and c.max_to_keep >= 1, "checkpoint.max_to_keep",
           c.max_to_keep, "an int >= 1")
  validation.require(validation.is_int(e.every_steps) and e.every_steps >= 0, "eval.every_steps", e.every_steps,
           "an int >= 0 (0: only at the end)")
  validation.require(validation.is_int(e.num_batches) and e.num_batches >= 1, "eval.num_batches", e.num_batches,
           "an int >= 1")
  validation.require(validation.is_int(g.every_steps) and g.every_steps >= 1, "logging.every_steps",
           g.every_steps, "an int >= 1")
  validation.require(g.tensorboard in ("auto", True, False), "logging.tensorboard", g.tensorboard,
           '"auto", True or False')
  per_device, devices = config.data.batch_size, jax.device_count()
  validation.require(per_device % devices == 0, "data.batch_size", per_device,
           f"a multiple of the {devices} devices")
  validation.require(per_device % t.accumulation_steps == 0, "data.batch_size", per_device,
           f"a multiple of train.accumulation_steps={t.accumulation_steps}")


# ---------------------------------------------------------------- signals
class _StopSignals:
  """Records SIGTERM / SIGINT instead of dying; a second SIGINT raises KeyboardInterrupt."""

  def __init__(self) -> None:
    self.received: str | None = None
    self._previous: dict[int, Any] = {}

  def _handle(self, signum: int, frame: Any) -> None:
    name = signal.Signals(signum).name
    if self.received == "SIGINT" and name == "SIGINT":
      raise KeyboardInterrupt
    self.received = name
    log.warning("%s received: finishing this step, then saving a checkpoint", name)

  def __enter__(self) -> "_StopSignals":
    try:
      for signum in (signal.SIGTERM, signal.SIGINT):
        self._previous[signum] = signal.signal(signum, self._handle)
    except ValueError:  # not the main thread: signals stay as they are
      self._previous.clear()
    return self

  def __exit__(self, *exc_info: Any) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)


# ---------------------------------------------------------------- helpers
def _check_finite(step: int, metrics: dict[str, float], last_checkpoint: int | None) -> None:
  """Raises NonFiniteError when any metric of `step` is NaN or Inf."""
  bad = {k: v for k, v in metrics.items() if not np.isfinite(v)}
  if bad:
    raise NonFiniteError(
        f"step {step}: non-finite {', '.join(f'{k}={v}' for k, v in bad.items())}; stopped "
        f"without saving (last checkpoint: step {last_checkpoint}). Lower optimizer.learning_rate "
        "or raise optimizer.warmup_steps, then rerun to resume from the checkpoint.")


def _mean(records: list[dict[str, float]]) -> dict[str, float]:
  """Per-key mean of metric dicts."""
  return {k: float(np.mean([r[k] for r in records])) for k in records[0]}


def _device_batches(batches: Iterator[dict[str, np.ndarray]],
                    sharding: NamedSharding) -> Iterator[dict[str, jax.Array]]:
  """Process-local numpy batches -> global arrays sharded over the data axis."""
  for batch in batches:
    yield {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
           for k, v in batch.items()}


class _Discard:
  """The metrics writer of the non-primary processes: writes nothing."""

  def write(self, step: int, metrics: dict[str, float], *, split: str) -> None:
    del step, metrics, split


def _write_json(path: str, value: Any) -> None:
  """Writes JSON atomically (temp file + rename)."""
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(value, f, indent=2, sort_keys=True, default=str)
  os.replace(tmp, path)


# ---------------------------------------------------------------- the run
def _only_startup_files(workdir: str) -> bool:
  """True when `workdir` holds nothing a run produced: at most config.json and an empty
  checkpoints directory."""
  for name in os.listdir(workdir):
    path = os.path.join(workdir, name)
    if name == "checkpoints" and os.path.isdir(path) and not os.listdir(path):
      continue
    if name != "config.json":
      return False
  return True


def _resume_step(checkpointer: Checkpointer, restore_step: int | None) -> int:
  """The step to resume from: the newest checkpoint, or `restore_step` (whose newer
  checkpoints are moved aside); 0 for a fresh run."""
  saved = checkpointer.all_steps()
  if restore_step is None:
    return saved[-1] if saved else 0
  validation.require(restore_step in saved, "--step", restore_step,
                     f"a saved checkpoint step of {checkpointer.directory}: {saved}"
                     if saved else f"no value: {checkpointer.directory} has no checkpoint")
  newer = [s for s in saved if s > restore_step]
  if newer:
    moved = checkpointer.set_aside(newer)
    log.warning("resuming from step %d: moved the newer checkpoints %s to %s", restore_step,
                newer, os.path.dirname(moved[0]))
  return restore_step


def _eval_missing(workdir: str, step: int, every: int, num_steps: int) -> bool:
  """An eval was due at `step` (an eval step before the last) and metrics.jsonl lacks it."""
  if not every or step % every or not 0 < step < num_steps:
    return False
  if not os.path.exists(os.path.join(workdir, metrics_lib.METRICS_FILE)):
    return True
  return not any(r.get("split") == "eval" and r.get("step") == step
                 for r in metrics_lib.read_metrics(workdir))


def train(config: ml_collections.ConfigDict, *, restore_step: int | None = None) -> TrainResult:
  """Trains (or resumes) the run described by `config` in `config.workdir`.

  restore_step: resume from this checkpoint instead of the newest (None: the newest).
  """
  validate_config(config)
  workdir = os.path.abspath(config.workdir)
  created = not os.path.exists(workdir)
  os.makedirs(workdir, exist_ok=True)
  try:
    return _train(config, workdir, restore_step)
  except BaseException:
    if created and os.path.isdir(workdir) and _only_startup_files(workdir):
      shutil.rmtree(workdir, ignore_errors=True)   # a failed start leaves no empty workdir
    raise


def _train(config: ml_collections.ConfigDict, workdir: str,
           restore_step: int | None) -> TrainResult:
  """`train` in an existing work directory."""
  primary = jax.process_index() == 0
  dataset = data_lib.build(config.data, process_index=jax.process_index(),
                           process_count=jax.process_count())
  model_config = pretrained.run_model_config(config, dataset.vocab_size)
  trainable = config.optimizer.get("trainable", "all")
  validation.require(trainable != "lora" or model_config.lora_rank > 0, "optimizer.trainable",
                     trainable, "'all': the model has no LoRA adapters (set model.lora_rank)")
  num_steps = config.train.num_steps
  tx, schedule = optim.make_optimizer(config.optimizer, num_steps)

  place = placement.make_placement(config.get("mesh"), model_config, tx,
                                   batch_size=config.data.batch_size,
                                   accumulation_steps=config.train.accumulation_steps,
                                   seq_len=config.data.seq_len)
  graphdef = steps.abstract_params(model_config)[0]
  abstract = placement.abstract_state(place, model_config, tx)
  with contextlib.ExitStack() as resources:  # closed on any exit, errors included
    iterator = dataset.train_iterator()
    if hasattr(iterator, "close"):  # grain's multiprocessing prefetch has worker processes
      resources.callback(iterator.close)
    checkpointer = resources.enter_context(
        Checkpointer(workdir, max_to_keep=config.checkpoint.max_to_keep))
    meta = {"config": json.loads(config.to_json_best_effort()),
            "model": dataclasses.asdict(model_config)}

    start = _resume_step(checkpointer, restore_step)
    if start:   # restored straight into the shardings; nothing initialised or read first
      checkpointer.check_compatible(start, abstract_params=abstract.params,
                                    abstract_opt_state=abstract.opt_state,
                                    model_fields=meta["model"])
      restored = checkpointer.restore(start, abstract_params=abstract.params,
                                      abstract_opt_state=abstract.opt_state,
                                      data_iterator=iterator)
      params, opt_state = restored["params"], restored["opt_state"]
      log.info("resumed from the checkpoint at step %d in %s", start, checkpointer.directory)
    else:
      fresh = placement.init_state(place, model_config, tx, config.seed,
                                   params=pretrained.initial_params(model_config, config))
      params, opt_state = fresh.params, fresh.opt_state
    if primary:
      _write_json(os.path.join(workdir, "config.json"), meta)
    state = steps.TrainState(jnp.asarray(start, jnp.int32), params, opt_state)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    log.info("model: %s parameters, %d layers %s; %d devices (%s); steps %d -> %d",
             f"{n_params:,}", model_config.num_layers, "".join(model_config.layer_types),
             jax.device_count(), place.describe(), start, num_steps)

    train_step = placement.jit_train_step(place, graphdef, tx, schedule,
                                          config.train.accumulation_steps,
                                          optim.trainable_mask(config.optimizer))
    eval_step = placement.jit_eval_step(place, graphdef)
    eval_batches = list(_device_batches(iter(dataset.validation_batches(config.eval.num_batches)),
                                      place.batch))

    def evaluate(step: int) -> dict[str, float]:
      sums = [jax.device_get(eval_step(state.params, batch)) for batch in eval_batches]
      result = steps.summarise_eval([{k: float(v) for k, v in s.items()} for s in sums])
      writer.write(step, result, split="eval")
      log.info("eval step %d: loss %.4f perplexity %.2f accuracy %.4f", step, result["loss"],
               result["perplexity"], result["accuracy"])
      return result

    tokens_per_step = config.data.batch_size * config.data.seq_len
    last_train: dict[str, float] = {}
    last_eval: dict[str, float] = {}
    last_checkpoint = start or None
    interrupted = None
    with contextlib.ExitStack() as stack:
      stop = stack.enter_context(_StopSignals())
      writer = (stack.enter_context(metrics_lib.MetricsWriter(
          workdir, tensorboard=config.logging.tensorboard)) if primary else _Discard())
      bar = metrics_lib.ProgressBar(num_steps, initial_step=start,
                                    enabled=primary and config.logging.progress)
      pending: tuple[int, dict[str, jax.Array]] | None = None
      window: list[dict[str, float]] = []
      # tokens/s between log points, from the end of the first step (which compiles) on
      timer = metrics_lib.StepTimer(skip_first=True)
      if _eval_missing(workdir, start, config.eval.every_steps, num_steps):
        last_eval = evaluate(start)   # a signal stopped the run where this eval was due

      def flush() -> None:
        """Fetches the pending step's metrics: NaN check, progress, logging."""
        nonlocal pending, last_train
        if pending is None:
          return
        step, device_metrics = pending
        pending = None
        host = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
        timer.tick(tokens_per_step)  # the step is done: its metrics are on the host
        _check_finite(step, host, last_checkpoint)
        window.append(host)
        if step % config.logging.every_steps == 0 or step == num_steps:
          rate = timer.lap()  # NaN for a window of only the compiling first step
          last_train = dict(_mean(window), **({} if math.isnan(rate) else
                                              {"tokens_per_second": rate}))
          writer.write(step, last_train, split="train")
          window.clear()
        bar.update(step, loss=host["loss"], tokens_per_second=last_train.get(
            "tokens_per_second", 0.0))

      def save(step: int) -> None:
        nonlocal last_checkpoint
        flush()
        checkpointer.save(step, params=state.params, opt_state=state.opt_state,
                          data_iterator=iterator, meta=meta)
        last_checkpoint = step

      batches = _device_batches(iterator, place.batch)
      step = start
      while step < num_steps:
        state, device_metrics = train_step(state, next(batches))
        flush()  # the previous step's metrics; this step keeps running meanwhile
        step += 1
        pending = (step, device_metrics)
        if stop.received:
          save(step)
          interrupted = stop.received
          break
        if config.checkpoint.every_steps and step % config.checkpoint.every_steps == 0:
          save(step)
        if config.eval.every_steps and step % config.eval.every_steps == 0 and step < num_steps:
          flush()
          last_eval = evaluate(step)
      flush()
      bar.close()
      if interrupted is None:
        save(step)
        last_eval = evaluate(step)

    result = TrainResult(workdir, start, step, last_train, last_eval, interrupted)
    if primary:
      plot.plot_losses(workdir)
      if interrupted is None and config.sample.num_samples > 0 and config.data.source != "mqar":
        model = nnx.merge(graphdef, state.params)
        result.samples = sample.sample_text(model, dataset.tokenizer, config.sample,
                                            seed=config.seed)
        sample.write_samples(workdir, step, result.samples)
    return result

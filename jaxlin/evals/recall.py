"""MQAR recall: which token mixer recalls, at several difficulty levels, over several seeds.

    from jaxlin.evals import recall
    setup = recall.Setup(levels=(4, 8), steps=600)
    results = recall.run(setup, ["gla", "gated_deltanet", "mom-gated_deltanet"])
    recall.plot(setup, results, "recall.png", "MQAR")

The harness of `benchmarks/recall.py` (the CLI: every mixer, JSON + PNG), `tests/test_recall.py`
and `colab/recall.ipynb`.

Multi-query associative recall (Zoology; `jaxlin.data.mqar`): n key-value pairs, then
every key again; the model must emit the key's value. Accuracy is taken on the answer
positions of held-out examples. Two plateaus are not recall: chance over the values
(1 / (vocab / 2)), and answering with any value seen in the context (about 1/n, no
binding of value to key). Recall is accuracy clearly above 1/n.

Every mixer gets the same 2-layer model (d_model, heads, MLP), the same steps, optimizer
(run.py's AdamW) and data, and, as Zoology gives every model, the short causal conv in
every linear and MoM layer (`Setup.short_conv=-1`: each variant's own default; without it
bla, lightning and gla stay on the plateau for 600 steps). The levels differ only in n
(the sequence length is fixed), so the harder level asks each memory to hold more pairs;
the state size of each model (floats of its decoding cache per sequence, at the task's
length; a softmax layer's KV cache grows with it) is in the legend. All (level, learning
rate, seed) replicas of one mixer train together as one vmapped step: one compilation
per mixer, the replicas measured under the same machine load. All-softmax trains at 0.3x
the learning rate (`LEARNING_RATE_SCALE`: it stays on the plateau at 1e-2).

`run` returns every replica's accuracy and loss curve; `plot` draws accuracy vs n (mean over
seeds, each seed a dot). Targets (the MoM paper's ordering, not tests): on the
harder level MoM over Gated DeltaNet >= Gated DeltaNet >= GLA, softmax at the top.
`tests/test_recall.py` runs this harness on n = 4 as a slow test.

Legend: R replicas (levels x learning rates x seeds), B batch, T sequence length, V vocab.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from flax import nnx
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from jaxlin.config import ModelConfig
from jaxlin.data import mqar
from jaxlin.layers.linear_attention import VARIANTS
from jaxlin.model import LanguageModel, aux_loss
from jaxlin.training import optim

# One entry per mixer: ModelConfig fields over the shared base (`base_model`).
MIXERS: dict[str, dict[str, Any]] = {
    **{name: {"linear_variant": name} for name in VARIANTS},
    "mom-gla": {"mixer": "mom", "mom_core": "gla"},
    "mom-gated_deltanet": {"mixer": "mom", "mom_core": "gated_deltanet"},
    "hybrid-gated_deltanet": {"linear_variant": "gated_deltanet", "pattern": "LN"},
    "softmax": {"pattern": "N"},
}
# Mixers that need their own learning rate (every replica's is scaled by it): all-softmax
# stays on the plateau at 1e-2 and 3e-2 here and reaches 1.0 at 1e-3 and 3e-3 (n = 4, 600 steps).
LEARNING_RATE_SCALE: dict[str, float] = {"softmax": 0.3}


@dataclasses.dataclass(frozen=True)
class Setup:
  """The task, the model and the budget shared by every mixer."""
  levels: tuple[int, ...] = (4, 8)      # num_kv_pairs of each difficulty level
  seeds: int = 2                        # replicas per level (init and data order)
  seq_len: int = 32                     # T: 2n key-value tokens, then the queries
  vocab_size: int = 32                  # keys [1, 16), values [16, 32)
  d_model: int = 64
  num_heads: int = 2                    # head dim 32: a 32 x 32 state per head and layer
  num_layers: int = 2
  batch_size: int = 32
  steps: int = 600
  learning_rates: tuple[float, ...] = (1e-2,)  # AdamW peaks (10% warmup, cosine to 10%); with
                                        # several, each mixer is scored at its best (Zoology)
  weight_decay: float = 0.1
  train_examples: int = 16384           # per (level, seed); then reused (epochs)
  eval_examples: int = 256              # per level, held out (validation split)
  eval_every: int = 100
  short_conv: int = 1                   # -1: each mixer's own; 1 / 0: force the short conv
                                        # on / off in every linear or MoM layer
  dense_init: str = "normal"            # ModelConfig.dense_init of the head and MLPs
  output_gate: int = -1                 # -1: each mixer's own; 1 / 0: force the swish output
                                        # gate on / off in every linear or MoM layer
  decay_dt_max: float = 0.0             # > 0: dt_max of the "mamba2" decay gate (Mamba2, Gated
                                        # DeltaNet, Comba, their MoM; dt_min = min(1e-3, it));
                                        # 0: the papers' 0.1. Smaller: a longer initial memory

  @property
  def replicas(self) -> list[tuple[int, float, int]]:
    """(num_kv_pairs, learning rate, seed) of every replica, level-major."""
    return [(n, lr, s) for n in self.levels for lr in self.learning_rates
            for s in range(self.seeds)]


def base_model(setup: Setup) -> dict[str, Any]:
  """The ModelConfig fields every mixer shares."""
  return dict(vocab_size=setup.vocab_size, d_model=setup.d_model, num_layers=setup.num_layers,
              num_heads=setup.num_heads, pattern="L", moe_every=0, mlp_hidden=2 * setup.d_model,
              chunk_size=16, dtype="float32", tie_embeddings=False,
              dense_init=setup.dense_init)


def model_config(setup: Setup, mixer: str) -> ModelConfig:
  """The ModelConfig of `mixer` (a key of MIXERS)."""
  if mixer not in MIXERS:
    raise ValueError(f"mixer: got {mixer!r}; expected one of {tuple(MIXERS)}")
  fields = {**base_model(setup), **MIXERS[mixer]}
  if setup.short_conv >= 0:
    fields["use_short_conv"] = bool(setup.short_conv)
  options = "mom_options" if fields.get("mixer") == "mom" else "linear_options"
  if setup.output_gate >= 0:
    fields[options] = {**fields.get(options, {}), "use_output_gate": bool(setup.output_gate)}
  if setup.decay_dt_max > 0:   # the gates that have no dt ignore these options
    dt = {"dt_max": setup.decay_dt_max, "dt_min": min(1e-3, setup.decay_dt_max)}
    fields[options] = {**fields.get(options, {}), "gate_options": dt}
  return ModelConfig(**fields)


def examples(setup: Setup, num_kv_pairs: int, seed: int, split: str,
             count: int) -> dict[str, np.ndarray]:
  """`count` MQAR examples of one level, stacked: inputs, targets, weights [count, T]."""
  task = mqar.MqarTask(vocab_size=setup.vocab_size, num_kv_pairs=num_kv_pairs,
                       seq_len=setup.seq_len, seed=seed)
  rows = [task.example(split, i) for i in range(count)]
  return {k: np.stack([r[k] for r in rows]) for k in ("inputs", "targets", "weights")}


def state_floats(config: ModelConfig, seq_len: int) -> int:
  """Floats in the model's decoding cache for one sequence of `seq_len` tokens."""
  model = nnx.eval_shape(lambda: LanguageModel(config, rngs=nnx.Rngs(0)))
  cache = jax.eval_shape(lambda: model.init_cache(1, seq_len))
  return int(sum(math.prod(a.shape) for a in jax.tree.leaves(cache)
                 if jnp.issubdtype(a.dtype, jnp.floating)))


def _loss(model: LanguageModel, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """(weighted cross-entropy on the answers + aux losses, answer accuracy)."""
  logits, _, aux = model(batch["inputs"])
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  w = batch["weights"]
  hits = (jnp.argmax(logits, -1) == batch["targets"]).astype(jnp.float32)
  return jnp.sum(ce * w) / jnp.sum(w) + aux_loss(aux), jnp.sum(hits * w) / jnp.sum(w)


def trainer(config: ModelConfig, setup: Setup
            ) -> tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any]]:
  """(init(keys [R]) -> (params, opt_state), step(params, opt, batch, lr) -> (params, opt, loss),
  evaluate(params, batch) -> (loss, accuracy)); every function maps over the R replicas."""
  graph = nnx.graphdef(nnx.eval_shape(lambda: LanguageModel(config, rngs=nnx.Rngs(0))))
  # run.py's optimizer (AdamW b2 0.95, clipping, no decay on vectors and gates) with a
  # schedule that peaks at 1; each replica scales its updates by its own learning rate
  # (AdamW's update, weight decay included, is linear in the learning rate).
  opt_config = optim.default_config()
  opt_config.update(learning_rate=1.0, end_learning_rate=0.1,
                    warmup_steps=max(setup.steps // 10, 1), weight_decay=setup.weight_decay)
  optimizer, _ = optim.make_optimizer(opt_config, setup.steps)

  def init_one(key: jax.Array) -> tuple[nnx.State, optax.OptState]:
    params = nnx.state(LanguageModel(config, rngs=nnx.Rngs(params=key)))
    return params, optimizer.init(params)

  def loss_one(params: nnx.State, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    return _loss(nnx.merge(graph, params), batch)

  def step_one(params: nnx.State, opt_state: optax.OptState, batch: dict[str, jax.Array],
               learning_rate: jax.Array) -> tuple[nnx.State, optax.OptState, jax.Array]:
    (loss, _), grads = jax.value_and_grad(loss_one, has_aux=True)(params, batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    updates = jax.tree.map(lambda u: learning_rate * u, updates)
    return optax.apply_updates(params, updates), opt_state, loss

  init = jax.jit(jax.vmap(init_one))
  step = jax.jit(jax.vmap(step_one), donate_argnums=(0, 1))
  evaluate = jax.jit(jax.vmap(loss_one))
  return init, step, evaluate


def run_mixer(setup: Setup, mixer: str, train: dict[str, np.ndarray],
              held_out: dict[str, np.ndarray], log: Callable[[str], None] = print
              ) -> dict[str, Any]:
  """Trains every replica of `mixer`; train / held_out arrays are [R, N, T]."""
  config = model_config(setup, mixer)
  init, step, evaluate = trainer(config, setup)
  replicas = setup.replicas
  keys = jnp.stack([jax.random.key(1000 * seed + 17) for _, _, seed in replicas])
  scale = LEARNING_RATE_SCALE.get(mixer, 1.0)
  replicas = [(n, lr * scale, s) for n, lr, s in replicas]
  learning_rates = jnp.asarray([lr for _, lr, _ in replicas], jnp.float32)
  params, opt_state = init(keys)
  num_params = sum(int(np.prod(a.shape[1:])) for a in jax.tree.leaves(params))
  rows = np.arange(len(replicas))[:, None]
  curve: list[dict[str, Any]] = []
  start = time.perf_counter()
  compiled_at = None
  for i in range(setup.steps):
    order = np.random.default_rng([i // (setup.train_examples // setup.batch_size), 7])
    offset = (i * setup.batch_size) % setup.train_examples
    picks = order.permutation(setup.train_examples)[offset:offset + setup.batch_size]
    batch = {k: jnp.asarray(v[rows, picks[None]]) for k, v in train.items()}
    params, opt_state, loss = step(params, opt_state, batch, learning_rates)
    if i == 0:
      jax.block_until_ready(loss)
      compiled_at = time.perf_counter()
    if (i + 1) % setup.eval_every == 0 or i + 1 == setup.steps:
      eval_loss, accuracy = (np.asarray(a) for a in evaluate(
          params, {k: jnp.asarray(v) for k, v in held_out.items()}))
      curve.append({"step": i + 1, "train_loss": np.asarray(loss).tolist(),
                    "eval_loss": eval_loss.tolist(), "accuracy": accuracy.tolist()})
      per_step = (time.perf_counter() - compiled_at) / max(i, 1)
      log(f"  {mixer:22s} step {i + 1:5d}  accuracy "
          + " ".join(f"{a:.2f}" for a in accuracy) + f"  ({per_step:.2f} s/step)")
  final = curve[-1]
  return {"mixer": mixer, "fields": MIXERS[mixer], "parameters": num_params,
          "state_floats": state_floats(config, setup.seq_len),
          "replicas": [{"num_kv_pairs": n, "learning_rate": lr, "seed": s,
                        "accuracy": final["accuracy"][r], "eval_loss": final["eval_loss"][r]}
                       for r, (n, lr, s) in enumerate(replicas)],
          "curve": curve, "seconds": time.perf_counter() - start}


def best_replicas(setup: Setup, result: dict[str, Any], n: int) -> list[dict[str, Any]]:
  """The seeds of level n at the learning rate with the best mean accuracy."""
  del setup
  rates = sorted({r["learning_rate"] for r in result["replicas"]})
  by_lr = {lr: [r for r in result["replicas"] if r["num_kv_pairs"] == n
                and r["learning_rate"] == lr] for lr in rates}
  return max(by_lr.values(), key=lambda rs: np.mean([r["accuracy"] for r in rs]))


def summarise(setup: Setup, result: dict[str, Any]) -> dict[int, dict[str, float]]:
  """{num_kv_pairs: mean, min, max accuracy over the seeds at the best learning rate}."""
  out = {}
  for n in setup.levels:
    best = best_replicas(setup, result, n)
    acc = [r["accuracy"] for r in best]
    out[n] = {"mean": float(np.mean(acc)), "min": float(np.min(acc)),
              "max": float(np.max(acc)), "learning_rate": best[0]["learning_rate"]}
  return out


def plot(setup: Setup, results: list[dict[str, Any]], path: str | None, title: str) -> Figure:
  """Accuracy vs num_kv_pairs, one line per mixer (mean over seeds, seeds as dots), with each
  model's state size in the legend; saved to `path` (a PNG) unless it is None."""
  fig = Figure(figsize=(9, 6))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  levels = list(setup.levels)
  for i, result in enumerate(results):
    color = matplotlib.colormaps["tab20"](i % 20)
    means = [result["summary"][n]["mean"] for n in levels]
    label = f"{result['mixer']} (state {result['state_floats']:,})"
    ax.plot(levels, means, "-o", color=color, label=label)
    for n in levels:
      for r in best_replicas(setup, result, n):
        ax.plot(n, r["accuracy"], ".", color=color, alpha=0.5)
  ax.plot(levels, [1 / n for n in levels], "k--", label="1/n: any seen value (no recall)")
  ax.set_xscale("log", base=2)
  ax.set_xticks(levels, [str(n) for n in levels])
  ax.set_ylim(0, 1.02)
  ax.set_xlabel("key-value pairs n")
  ax.set_ylabel("answer accuracy (held out)")
  ax.set_title(title, fontsize=9)
  ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
  fig.tight_layout()
  if path is not None:
    fig.savefig(path, dpi=110)
  return fig


def datasets(setup: Setup) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """(train, held_out): every replica's arrays stacked [R, N, T] (`setup.replicas` order);
  each (level, seed) its own training examples, each level one held-out set."""
  made = {(n, s): examples(setup, n, s, "train", setup.train_examples)
          for n in setup.levels for s in range(setup.seeds)}
  train = [made[n, s] for n, _, s in setup.replicas]
  held = {n: examples(setup, n, 0, "validation", setup.eval_examples) for n in setup.levels}
  return ({k: np.stack([t[k] for t in train]) for k in train[0]},
          {k: np.stack([held[n][k] for n, _, _ in setup.replicas]) for k in train[0]})


def run(setup: Setup, mixers: list[str], log: Callable[[str], None] = print,
        on_result: Callable[[list[dict[str, Any]]], None] | None = None
        ) -> list[dict[str, Any]]:
  """Trains and scores every mixer (each result has its "summary", `summarise`);
  `on_result(results so far)` after each mixer (e.g. to write them: nothing lost)."""
  for mixer in mixers:
    model_config(setup, mixer)   # a bad name fails before any training
  train, held_out = datasets(setup)
  results = []
  for mixer in mixers:
    result = run_mixer(setup, mixer, train, held_out, log=log)
    result["summary"] = summarise(setup, result)
    results.append(result)
    log(f"{mixer:22s} " + "  ".join(
        f"n={n}: {a['mean']:.3f} [{a['min']:.3f}, {a['max']:.3f}] lr {a['learning_rate']:g}"
        for n, a in result["summary"].items())
        + f"  state {result['state_floats']:,}  {result['seconds']:.0f}s")
    if on_result is not None:
      on_result(results)
  return results

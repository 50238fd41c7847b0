"""The functional train and eval steps of `jaxlin.training.train`.

A batch is a dict of [B, T] arrays: `inputs`, `targets` (int32), `segment_ids`
(int32; packed documents) and `weights` (float32; 0 where a position must not
be trained: padding, a target in another document, non-answer MQAR tokens).
With ce_i the cross-entropy of position i and W = sum_i w_i over the global
batch, split into A micro-batches m (gradient accumulation):

    objective = sum_m [ sum_{i in m} w_i ce_i / W  +  aux_m / A ]

which for A = 1 is the weighted mean cross-entropy plus the model's aux losses
(already weighted by their coefficients: MoE load balance and z-loss, MoM
balance); accumulation over A micro-batches gives the same cross-entropy term.

The model is `nnx.split` once outside (graphdef + a pure dict of parameters)
and `nnx.merge`d inside the jitted step; the step donates the old state.

Legend: B global batch, T sequence length, A accumulation steps, V vocabulary.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxlin.model import LanguageModel, aux_loss

f32 = jnp.float32
Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


class TrainState(NamedTuple):
  """Everything a train step updates: the step count, parameters and optimizer state."""
  step: jax.Array      # int32 scalar: optimizer steps taken
  params: Any          # nnx pure dict of the model's parameters
  opt_state: Any       # optax state


def init_params(model_config: Any, seed: int, shardings: Any | None = None
                ) -> tuple[nnx.GraphDef, Any]:
  """(graphdef, parameters as a pure dict) of LanguageModel(model_config), initialised in jit;
  with `shardings` (a tree of them) each leaf is created already sharded (no full copy)."""
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: LanguageModel(model_config, rngs=nnx.Rngs(0))))
  params = jax.jit(lambda: nnx.to_pure_dict(
      nnx.state(LanguageModel(model_config, rngs=nnx.Rngs(seed)), nnx.Param)),
      out_shardings=shardings)()
  return graphdef, params


def abstract_params(model_config: Any, sharding: jax.sharding.Sharding | None = None
                    ) -> tuple[nnx.GraphDef, Any]:
  """(graphdef, pure dict of ShapeDtypeStructs) of the parameters, nothing allocated.

  `sharding` (default: replicated over all devices) is where a restore puts them.
  """
  if sharding is None:
    sharding = jax.sharding.NamedSharding(
        jax.sharding.Mesh(np.asarray(jax.devices()), ("data",)), jax.sharding.PartitionSpec())
  graphdef, state = nnx.split(
      nnx.eval_shape(lambda: LanguageModel(model_config, rngs=nnx.Rngs(0))), nnx.Param)
  return graphdef, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                                nnx.to_pure_dict(state))


LOSS_CHUNK = 512   # positions per chunk of the loss (chunked_cross_entropy)


def weighted_cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array,
                           weights_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(sum_i w_i ce_i, sum_i w_i [argmax logits_i == target_i]), both float32 scalars."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits_BTV.astype(f32), targets_BT)
  correct = (jnp.argmax(logits_BTV, axis=-1) == targets_BT).astype(f32)
  return jnp.sum(ce * weights_BT), jnp.sum(correct * weights_BT)


def chunked_cross_entropy(h_BTD: jax.Array, head_DV: jax.Array, targets_BT: jax.Array,
                          weights_BT: jax.Array, chunk: int = LOSS_CHUNK
                          ) -> tuple[jax.Array, jax.Array]:
  """`weighted_cross_entropy` of logits = h head, computed `chunk` positions at a time under
  remat: only one chunk's [B, chunk, V] logits live, forward and backward (a 152k vocabulary
  at T = 2048 would otherwise hold several [B, T, V] float32 buffers). T not a multiple of
  `chunk`: one chunk."""
  B, T, D = h_BTD.shape
  if T % chunk or T == chunk:
    return weighted_cross_entropy(LanguageModel.logits(h_BTD, head_DV), targets_BT, weights_BT)
  n = T // chunk
  split = lambda x: x.reshape(B, n, chunk, *x.shape[2:]).swapaxes(0, 1)   # [n, B, chunk, ...]

  @jax.checkpoint
  def terms(h: jax.Array, targets: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    return weighted_cross_entropy(LanguageModel.logits(h, head_DV), targets, weights)

  def body(carry: tuple[jax.Array, jax.Array], xs: tuple) -> tuple[tuple, None]:
    ce, correct = terms(*xs)
    return (carry[0] + ce, carry[1] + correct), None

  zero = jnp.zeros((), f32)
  (ce_sum, correct), _ = jax.lax.scan(body, (zero, zero),
                                      (split(h_BTD), split(targets_BT), split(weights_BT)))
  return ce_sum, correct


def forward(graphdef: nnx.GraphDef, params: Any,
            batch: Batch) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
  """(weighted ce sum, weighted correct count, aux dict) of the model on one batch."""
  model = nnx.merge(graphdef, params)
  h, _, aux = model.features(batch["inputs"], segment_ids=batch["segment_ids"])
  ce_sum, correct = chunked_cross_entropy(h, model.head_matrix(), batch["targets"],
                                          batch["weights"])
  return ce_sum, correct, aux


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, accumulation_steps: int = 1,
                    trainable: Callable[[Any], Any] | None = None,
                    gradient_shardings: Any = None
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
  """train_step(state, batch) -> (state, metrics); not jitted (jaxlin.training.train jits it once).

  metrics: loss (weighted mean cross-entropy), aux_loss, accuracy, grad_norm
  (before clipping), learning_rate (of this update), tokens (sum of weights)
  and the model's aux metrics (e.g. "mlp/moe_load_balance_loss").
  trainable: None (every parameter trains) or params -> a tree of bools (e.g.
  `optim.lora_mask`): the other leaves get zero gradients, so XLA drops their weight-gradient
  matmuls, and grad_norm is over the trainable leaves only.
  gradient_shardings: None, or the parameters' shardings (a tree like params): every
  micro-batch's gradients and their running sum are kept in them (FSDP: reduce-scattered per
  micro-batch into sharded accumulators, never a full-size gradient per device).
  """
  A = accumulation_steps

  def objective(params: Any, micro: Batch, total_weight: jax.Array
                ) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array, dict]]:
    ce_sum, correct, aux = forward(graphdef, params, micro)
    aux_total = aux_loss(aux)
    return ce_sum / total_weight + aux_total / A, (ce_sum, correct, aux_total, aux)

  grad_fn = jax.grad(objective, has_aux=True)

  def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    total_weight = jnp.maximum(jnp.sum(batch["weights"].astype(f32)), 1.0)

    def micro_terms(micro: Batch) -> tuple[Any, jax.Array, jax.Array, jax.Array, dict]:
      grads, (ce_sum, correct, aux_total, aux) = grad_fn(state.params, micro, total_weight)
      if gradient_shardings is not None:
        grads = jax.lax.with_sharding_constraint(grads, gradient_shardings)
      if trainable is not None:   # frozen leaves: zeros, before any sum keeps their grads alive
        grads = jax.tree.map(lambda g, train: g if train else jnp.zeros_like(g), grads,
                             trainable(state.params))
      return grads, ce_sum, correct, aux_total, aux

    if A == 1:
      terms = micro_terms(batch)
    else:  # sum the A micro-batches' terms in a scan (one micro-batch's activations live);
      # micro-batch a is rows a, a + A, a + 2A, ...: a batch sharded over devices in contiguous
      # blocks keeps every micro-batch spread over all of them
      micro_batches = jax.tree.map(
          lambda x: x.reshape(x.shape[0] // A, A, *x.shape[1:]).swapaxes(0, 1), batch)
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(
          micro_terms, jax.tree.map(lambda x: x[0], micro_batches)))
      if gradient_shardings is not None:
        zeros = (jax.lax.with_sharding_constraint(zeros[0], gradient_shardings), *zeros[1:])
      terms, _ = jax.lax.scan(lambda carry, micro: (jax.tree.map(
          jnp.add, carry, micro_terms(micro)), None), zeros, micro_batches)
    grads, ce_sum, correct, aux_total, aux = terms
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": ce_sum / total_weight, "aux_loss": aux_total / A,
        "accuracy": correct / total_weight, "grad_norm": optax.tree.norm(grads),
        "learning_rate": schedule(state.step), "tokens": jnp.sum(batch["weights"]),
        **{key: jnp.asarray(value, f32) / A for key, value in aux.items()}}
    return TrainState(state.step + 1, params, opt_state), metrics

  return train_step


def make_eval_step(graphdef: nnx.GraphDef) -> Callable[[Any, Batch], Metrics]:
  """eval_step(params, batch) -> {"ce_sum", "correct", "weight"} (sums to aggregate on host)."""
  def eval_step(params: Any, batch: Batch) -> Metrics:
    ce_sum, correct, _ = forward(graphdef, params, batch)
    return {"ce_sum": ce_sum, "correct": correct,
            "weight": jnp.sum(batch["weights"].astype(f32))}
  return eval_step


def summarise_eval(sums: list[dict[str, float]]) -> dict[str, float]:
  """loss (weighted mean ce), perplexity = exp(loss), accuracy from per-batch sums."""
  weight = sum(s["weight"] for s in sums)
  if weight <= 0:
    raise ValueError("the validation batches have no weighted position (all weights are 0)")
  loss = sum(s["ce_sum"] for s in sums) / weight
  return {"loss": loss, "perplexity": float(jnp.exp(jnp.minimum(loss, 80.0))),
          "accuracy": sum(s["correct"] for s in sums) / weight}

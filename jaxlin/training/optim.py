"""The optimizer of `jaxlin.training.train`: AdamW, warmup + cosine schedule, clipping, decay mask.

    lr(s) = peak * s / warmup                                  s <  warmup
    lr(s) = end + (peak - end) * (1 + cos(pi * r)) / 2         r = (s - warmup) / (steps - warmup)

    update = AdamW(clip_by_global_norm(g, grad_clip); b1, b2, eps, weight_decay * mask)

`trainable="lora"` trains only the LoRA adapters (`lora_a`, `lora_b`; jaxlin.layers.lora): every
other parameter gets a zero update and no optimizer state, and the clipping norm is the
adapters' own.

Weight decay applies to the matrices (ndim >= 2: projections, experts, the
embedding and head) and never to norms, biases or the parameters of a gate
(anything under a module named in `NO_DECAY_MODULES`: decay gates such as
Mamba2's A_log / dt_bias, MoM's per-memory gates, RWKV6's bonus and token-shift mixes).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import ml_collections
import optax

from jaxlin import validation
from jaxlin.training import tree_paths

NO_DECAY_MODULES = frozenset({"gate", "gates", "bonus", "shift_mix"})  # gates: MoM's
TRAINABLE = ("all", "lora")
LORA_LEAVES = frozenset({"lora_a", "lora_b"})


def default_config() -> ml_collections.ConfigDict:
  """The optimizer fields of a run config (`config.optimizer`)."""
  c = ml_collections.ConfigDict()
  c.learning_rate = 3e-3       # peak learning rate, reached after warmup_steps
  c.end_learning_rate = 3e-4   # cosine decay ends here at the last step
  c.warmup_steps = 100         # linear warmup from 0
  c.b1 = 0.9                   # AdamW first-moment decay
  c.b2 = 0.95                  # AdamW second-moment decay
  c.eps = 1e-8                 # AdamW epsilon
  c.weight_decay = 0.1         # decoupled, on matrices only (see decay_mask)
  c.grad_clip = 1.0            # global-norm clipping; 0 disables
  c.trainable = "all"          # "all" parameters, or only the "lora" adapters (model.lora_rank)
  return c


def validate(config: ml_collections.ConfigDict, num_steps: int) -> None:
  """Raises ValueError naming the first invalid `optimizer.*` field."""
  def check(name: str, ok: bool, allowed: str) -> None:
    validation.require(ok, f"optimizer.{name}", config[name], allowed)
  check("learning_rate", config.learning_rate > 0, "> 0")
  check("end_learning_rate", 0 <= config.end_learning_rate <= config.learning_rate,
        f"in [0, learning_rate={config.learning_rate}]")
  check("warmup_steps", 0 <= config.warmup_steps < num_steps,
        f"an int in [0, train.num_steps={num_steps}): the warmup must end before the run "
        f"does; for this run try --config.optimizer.warmup_steps={num_steps // 10} (10%), "
        f"or raise --config.train.num_steps")
  check("b1", 0 <= config.b1 < 1, "in [0, 1)")
  check("b2", 0 <= config.b2 < 1, "in [0, 1)")
  check("eps", config.eps > 0, "> 0")
  check("weight_decay", config.weight_decay >= 0, ">= 0")
  check("grad_clip", config.grad_clip >= 0, ">= 0 (0 disables clipping)")
  check("trainable", config.get("trainable", "all") in TRAINABLE,
        f"one of {list(TRAINABLE)} (lora needs model.lora_rank > 0)")


def learning_rate_schedule(config: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
  """Linear warmup to `learning_rate`, then cosine decay to `end_learning_rate` at num_steps."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate, warmup_steps=config.warmup_steps,
      decay_steps=num_steps, end_value=config.end_learning_rate)


def decay_mask(params: Any) -> Any:
  """True for the parameters that get weight decay: ndim >= 2 and not inside a gate module."""
  def decays(path: tuple[Any, ...], leaf: jax.Array) -> bool:
    return leaf.ndim >= 2 and not NO_DECAY_MODULES.intersection(tree_paths.path_names(path))
  return jax.tree_util.tree_map_with_path(decays, params)


def trainable_labels(params: Any) -> Any:
  """"train" for the LoRA adapter leaves, "freeze" for every other parameter."""
  def label(path: tuple[Any, ...], leaf: jax.Array) -> str:
    del leaf
    return "train" if LORA_LEAVES.intersection(tree_paths.path_names(path)) else "freeze"
  return jax.tree_util.tree_map_with_path(label, params)


def lora_mask(params: Any) -> Any:
  """True for the LoRA adapter leaves (the only ones trainable="lora" trains), else False."""
  return jax.tree.map(lambda label: label == "train", trainable_labels(params))


def trainable_mask(config: ml_collections.ConfigDict) -> Callable[[Any], Any] | None:
  """The `trainable` argument of `steps.make_train_step` for this optimizer config."""
  return lora_mask if config.get("trainable", "all") == "lora" else None


def make_optimizer(config: ml_collections.ConfigDict,
                   num_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(AdamW with clipping and the decay mask, its learning-rate schedule); with
  trainable="lora" it updates the LoRA adapters only."""
  validate(config, num_steps)
  schedule = learning_rate_schedule(config, num_steps)
  tx = optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                   weight_decay=config.weight_decay, mask=decay_mask)
  if config.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip), tx)
  if config.get("trainable", "all") == "lora":
    tx = optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, trainable_labels)
  return tx, schedule

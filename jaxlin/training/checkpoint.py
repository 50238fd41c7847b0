"""Checkpoints of a training run: orbax `CheckpointManager` over `<workdir>/checkpoints`.

One checkpoint per saved step holds four items written together:

    params     the model parameters (nnx pure dict)          ocp.args.StandardSave
    opt_state  the optax state                               ocp.args.StandardSave
    data       the grain iterator state (exact data resume)  grain.checkpoint.CheckpointSave
    meta       {"step", "config", "model"} as JSON           ocp.args.JsonSave

orbax writes a step into a temporary directory and renames it when complete,
so an interrupted save never replaces a finished checkpoint, and
`max_to_keep` keeps the newest N. Before restoring, the shapes in the
checkpoint are compared with those the config builds: a mismatch raises
`CheckpointMismatchError` naming the arrays (and the differing model fields);
an unreadable checkpoint raises `CheckpointCorruptError` and is left in place; its
message offers the newest earlier step (`python run.py ... --step=N` resumes from it, and
`set_aside` moves the newer checkpoints to `<workdir>/checkpoints_set_aside`).
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Mapping

import grain
import grain.checkpoint
import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from jaxlin import validation
from jaxlin.training import tree_paths

SET_ASIDE = "checkpoints_set_aside"   # where --step=N moves the checkpoints newer than N


class CheckpointMismatchError(ValueError):
  """The checkpoint in the work directory does not fit the model the config builds."""


class CheckpointCorruptError(RuntimeError):
  """A checkpoint exists but cannot be read (partial copy, deleted or damaged files)."""


def _path_key(path: tuple[Any, ...]) -> str:
  """'blocks/0/mixer/q_proj/kernel' for a pytree path (int and str keys alike)."""
  return "/".join(tree_paths.path_names(path))


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """{path: shape} of every array leaf (arrays, ShapeDtypeStructs or orbax metadata)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {_path_key(path): tuple(leaf.shape) for path, leaf in leaves if hasattr(leaf, "shape")}


def shape_differences(saved: Any, expected: Any, *, limit: int = 8) -> list[str]:
  """Human-readable differences between two trees of array shapes (empty when they agree)."""
  saved_shapes, expected_shapes = _shapes(saved), _shapes(expected)
  lines = []
  for key in sorted(set(saved_shapes) | set(expected_shapes)):
    a, b = saved_shapes.get(key), expected_shapes.get(key)
    if a != b:
      lines.append(f"{key}: checkpoint {a if a is not None else 'missing'}, "
                   f"config {b if b is not None else 'missing'}")
  if len(lines) > limit:
    lines = lines[:limit] + [f"... and {len(lines) - limit} more"]
  return lines


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
  """'field: checkpoint X, config Y' for every model field that differs."""
  return [f"model.{key}: checkpoint {saved.get(key)!r}, config {current.get(key)!r}"
          for key in sorted(set(saved) | set(current)) if saved.get(key) != current.get(key)]


class Checkpointer:
  """Saves and restores (params, opt_state, data iterator, meta) under `<workdir>/checkpoints`."""

  def __init__(self, workdir: str, *, max_to_keep: int) -> None:
    validation.positive_int("checkpoint.max_to_keep", max_to_keep)
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.set_aside_directory = os.path.join(os.path.abspath(workdir), SET_ASIDE)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True,
        # synchronous: the data iterator's state is read at the moment of the save
        enable_async_checkpointing=False)
    handlers = dict(params=ocp.StandardCheckpointHandler(),
                    opt_state=ocp.StandardCheckpointHandler(),
                    data=grain.checkpoint.CheckpointHandler(), meta=ocp.JsonCheckpointHandler())
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """Steps of all complete checkpoints, oldest first."""
    return sorted(self._manager.all_steps())

  def set_aside(self, steps: list[int]) -> list[str]:
    """Moves the checkpoints of `steps` to `<workdir>/checkpoints_set_aside/<step>` (nothing
    is deleted; a name taken gets a suffix); returns the new paths."""
    moved = []
    for step in steps:
      target = os.path.join(self.set_aside_directory, str(step))
      suffix = 1
      while os.path.exists(target):
        target = os.path.join(self.set_aside_directory, f"{step}.{suffix}")
        suffix += 1
      moved.append(target)
    # every process has listed the steps; process 0 alone moves them; all reload after
    multihost_utils.sync_global_devices("jaxlin: checkpoints listed before set_aside")
    if jax.process_index() == 0:
      os.makedirs(self.set_aside_directory, exist_ok=True)
      for step, target in zip(steps, moved):
        shutil.move(os.path.join(self.directory, str(step)), target)
    multihost_utils.sync_global_devices("jaxlin: checkpoints set aside")
    self._manager.reload()
    return moved

  def save(self, step: int, *, params: Any, opt_state: Any,
           data_iterator: grain.DatasetIterator, meta: Mapping[str, Any]) -> None:
    """Writes checkpoint `step` (a no-op when that step is already saved)."""
    if step in self._manager.all_steps():
      return
    self._manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        opt_state=ocp.args.StandardSave(opt_state),
        data=grain.checkpoint.CheckpointSave(data_iterator),
        meta=ocp.args.JsonSave(dict(meta, step=step))), force=True)
    self._manager.wait_until_finished()

  def read_meta(self, step: int) -> dict[str, Any]:
    """The JSON metadata of checkpoint `step`."""
    try:
      return dict(self._manager.restore(step, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore()))["meta"])
    except Exception as error:  # orbax raises many kinds on damaged files
      raise self._corrupt(step, error) from error

  def check_compatible(self, step: int, *, abstract_params: Any, model_fields: Mapping[str, Any],
                       abstract_opt_state: Any = None) -> None:
    """Raises CheckpointMismatchError when the checkpoint's shapes differ from the config's."""
    try:
      metadata = self._manager.item_metadata(step)
      saved_params = metadata["params"]
      saved_opt = metadata["opt_state"] if abstract_opt_state is not None else None
    except Exception as error:
      raise self._corrupt(step, error) from error
    if saved_params is None:
      raise self._corrupt(step, FileNotFoundError("no 'params' item"))
    lines = shape_differences(saved_params, abstract_params)
    if not lines and saved_opt is not None:
      lines = shape_differences(saved_opt, abstract_opt_state)
    if lines:
      saved_model = self.read_meta(step).get("model", {})
      fields = config_differences(saved_model, model_fields)
      raise CheckpointMismatchError(
          f"the checkpoint at step {step} in {self.directory} does not fit the model of this "
          "config (nothing was overwritten). Differing arrays:\n  " + "\n  ".join(lines)
          + ("\nDiffering model fields:\n  " + "\n  ".join(fields) if fields else "")
          + "\nUse another workdir, or the config the checkpoint was trained with.")

  def restore(self, step: int, *, abstract_params: Any, abstract_opt_state: Any | None = None,
              data_iterator: grain.DatasetIterator | None = None) -> dict[str, Any]:
    """{"params", "meta"[, "opt_state"]} of checkpoint `step`; sets the iterator's state.

    `abstract_*` are trees of jax.ShapeDtypeStruct (with shardings) giving the
    structure, dtypes and placement to restore into.
    """
    items = dict(params=ocp.args.StandardRestore(abstract_params), meta=ocp.args.JsonRestore())
    if abstract_opt_state is not None:
      items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as error:
      raise self._corrupt(step, error) from error
    return {key: restored[key] for key in items if key != "data"}

  def _corrupt(self, step: int, error: Exception) -> CheckpointCorruptError:
    """The error for an unreadable checkpoint, with what to do about it."""
    earlier = [s for s in self.all_steps() if s < step]
    reason = str(error).splitlines()[0] if str(error) else ""
    return CheckpointCorruptError(
        f"checkpoint step {step} in {self.directory} cannot be read "
        f"({type(error).__name__}: {reason}); it was left untouched. "
        + (f"Rerun with --step={earlier[-1]} to use the newest earlier checkpoint (training moves "
           f"the newer ones to {self.set_aside_directory})" if earlier else
           "No earlier checkpoint: move that step's directory away to start from scratch")
        + ".")

  def close(self) -> None:
    """Waits for pending writes and releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.close()


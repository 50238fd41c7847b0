"""jaxlin's entry point: train a config, sample from or export a work directory's checkpoint.

    python run.py --config configs/default.py                        # train (or resume)
    python run.py --config configs/default.py --config.train.num_steps=50 --config.workdir=/tmp/x
    python run.py --config configs/default.py --mode=sample --prompt="ROMEO." --seed=1
    python run.py --config configs/liger.py --mode=export --out=/tmp/jaxlin/liger-hf
    python run.py --config configs/default.py --mode=fields          # every field, its comment
    python run.py --config configs/default.py --step=200             # resume from step 200

The work directory is `config.workdir`; running the same command again resumes from
its newest checkpoint (`--step=N`: from checkpoint N, newer ones are moved to
<workdir>/checkpoints_set_aside). SIGTERM / SIGINT save a checkpoint first.
A mistake in the config, the data or a checkpoint prints one line and exits 2
(`--debug`: the traceback).
"""

import logging
import os
import signal
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A configs/*.py file; override fields with --config.<group>.<field>=value.",
    lock_config=True)
_MODE = flags.DEFINE_enum("mode", "train", ["train", "sample", "export", "fields"],
                          "train: train or resume in config.workdir; sample: print samples of "
                          "a checkpoint there; export: write it as a Hugging Face directory "
                          "(--out; LoRA merged); fields: list every config field, its value and "
                          "its comment.")
_PROMPT = flags.DEFINE_string("prompt", None, "sample mode: the prompt (default: config.sample.prompt).")
_STEP = flags.DEFINE_integer("step", None, "the checkpoint step to resume from (train), to sample "
                             "(sample) or to write (export); default: the newest.")
_OUT = flags.DEFINE_string("out", None, "export mode: the directory to write.")
_SEED = flags.DEFINE_integer("seed", None, "sample mode: the sampling seed (default: config.seed).")
flags.DEFINE_boolean("debug", False, "show the traceback of a config / data / checkpoint error "
                     "(also JAXLIN_DEBUG=1).")

HELP_FLAGS = ("-h", "--help", "-help", "--helpshort", "-?")
CONFIGS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def _usage() -> str:
  configs = sorted(f for f in os.listdir(CONFIGS_DIR) if f.endswith(".py") and f != "__init__.py")
  return (f"usage: python run.py --config configs/<name>.py [--config.<group>.<field>=value ...] "
          f"[--mode=train|sample|export|fields]\nconfigs: {', '.join(configs)}")


def _override_paths(argv: list[str]) -> list[str]:
  """The field paths of the --config.<path>=value arguments."""
  return [a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config.")]


def _config_path(argv: list[str]) -> str | None:
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      return a.split("=", 1)[1]
    if a == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _flag_error(error: Exception, argv: list[str]) -> str:
  """One line for a command-line error: an unknown field names the closest one."""
  from jaxlin.training import cli
  path = _config_path(argv)
  if path is not None and os.path.isfile(path):
    try:
      config = cli.load_config_file(path)
    except Exception:  # the config file itself is broken: report the original error
      config = None
    if config is not None:
      fields = cli.flatten(config)
      for override in _override_paths(argv):
        if override not in fields and not any(f.startswith(override + ".") for f in fields):
          near = cli.closest_field(config, override)
          return (f"--config.{override}: {path} has no field {override!r}"
                  + (f"; did you mean {near!r}?" if near else "")
                  + f" (python run.py --config {path} --mode=fields lists every field)")
  return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing with --help exiting 0 and one-line errors exiting 2."""
  args = argv[1:]
  if any(a in HELP_FLAGS for a in args):
    print(__doc__)
    print(flags.FLAGS.main_module_help())
    sys.exit(0)
  if _config_path(args) is None:
    print(_usage(), file=sys.stderr)
    print("try: python run.py --config configs/default.py", file=sys.stderr)
    sys.exit(2)
  try:
    return flags.FLAGS(argv)
  except Exception as error:  # absl flag errors, ml_collections' unknown-field errors
    if "--debug" in args or os.environ.get("JAXLIN_DEBUG", "") not in ("", "0"):
      raise
    print(f"error: {_flag_error(error, args)}", file=sys.stderr)
    print(_usage().splitlines()[0], file=sys.stderr)
    sys.exit(2)


def run(argv: list[str]) -> int:
  """The chosen mode; returns the exit code."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from jaxlin.training import cli
  config = _CONFIG.value
  if _MODE.value == "fields":
    print(cli.describe_fields(config, config_flags.get_config_filename(flags.FLAGS["config"])))
    return 0
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                      stream=sys.stderr, force=True)
  logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every save step at INFO
  import jax  # after flag parsing, so --help is fast

  from jaxlin.training import distributed, export, sample, train
  distributed.initialize(config)   # before anything touches a device

  log = logging.getLogger("jaxlin")
  log.info("jax %s, process %d of %d, devices: %s", jax.__version__, jax.process_index(),
           jax.process_count(), jax.devices())
  log.info("workdir: %s", config.workdir)
  if _MODE.value == "sample":
    step, samples = sample.from_checkpoint(config, prompt=_PROMPT.value, step=_STEP.value,
                                           seed=_SEED.value)
    for i, text in enumerate(samples):
      print(f"===== step {step} sample {i} =====\n{text}")
    return 0
  if _MODE.value == "export":
    step, out = export.export_run(config, _OUT.value or "", step=_STEP.value)
    log.info("wrote checkpoint step %d to %s (config.json + model.safetensors)", step, out)
    return 0
  if _OUT.value is not None:
    raise ValueError(f"--out={_OUT.value}: only for --mode=export")
  if _SEED.value is not None:
    raise ValueError(f"--seed={_SEED.value}: only for --mode=sample; training takes "
                     f"--config.seed={_SEED.value}")
  if _PROMPT.value is not None:
    raise ValueError("--prompt: only for --mode=sample; the end-of-training samples take "
                     "--config.sample.prompt=...")
  result = train.train(config, restore_step=_STEP.value)
  for i, text in enumerate(result.samples):
    print(f"===== sample {i} =====\n{text}")
  if result.interrupted:
    log.warning("stopped by %s at step %d (checkpoint saved); rerun the same command to resume",
                result.interrupted, result.final_step)
    return 128 + signal.Signals[result.interrupted].value
  log.info("done at step %d: %s", result.final_step, result.last_eval)
  return 0


def main(argv: list[str]) -> int:
  """`run`, with user errors (config, data, checkpoint) as one line and exit code 2."""
  from jaxlin.training import cli
  try:
    return run(argv)
  except cli.USER_ERRORS as error:
    if flags.FLAGS.debug or cli.debug_requested(sys.argv) or not cli.is_user_error(error):
      raise
    cli.exit_user_error(str(error))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)

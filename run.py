"""jaxlin's entry point: train a config, or sample text from a work directory's checkpoint.

    python run.py --config configs/default.py                        # train (or resume)
    python run.py --config configs/default.py --config.train.num_steps=50 --config.workdir=/tmp/x
    python run.py --config configs/default.py --mode=sample --prompt="ROMEO."

The work directory is `config.workdir`; running the same command again
resumes from its newest checkpoint. SIGTERM / SIGINT save a checkpoint first.
"""

import logging
import signal
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A configs/*.py file; override fields with --config.<group>.<field>=value.",
    lock_config=True)
_MODE = flags.DEFINE_enum("mode", "train", ["train", "sample"],
                          "train: train or resume in config.workdir; sample: print samples of "
                          "the newest checkpoint there.")
_PROMPT = flags.DEFINE_string("prompt", None, "sample mode: the prompt (default: config.sample.prompt).")
_STEP = flags.DEFINE_integer("step", None, "sample mode: the checkpoint step (default: the newest).")
flags.mark_flags_as_required(["config"])


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                      stream=sys.stderr, force=True)
  logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every save step at INFO
  import jax  # after flag parsing, so --help is fast

  from jaxlin.training import sample, train

  config = _CONFIG.value
  log = logging.getLogger("jaxlin")
  log.info("jax %s, process %d of %d, devices: %s", jax.__version__, jax.process_index(),
           jax.process_count(), jax.devices())
  log.info("workdir: %s", config.workdir)
  if _MODE.value == "sample":
    step, samples = sample.from_checkpoint(config, prompt=_PROMPT.value, step=_STEP.value)
    for i, text in enumerate(samples):
      print(f"===== step {step} sample {i} =====\n{text}")
    return 0
  result = train.train(config)
  for i, text in enumerate(result.samples):
    print(f"===== sample {i} =====\n{text}")
  if result.interrupted:
    log.warning("stopped by %s at step %d (checkpoint saved); rerun the same command to resume",
                result.interrupted, result.final_step)
    return 128 + signal.Signals[result.interrupted].value
  log.info("done at step %d: %s", result.final_step, result.last_eval)
  return 0


if __name__ == "__main__":
  app.run(main)

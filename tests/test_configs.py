"""Every configs/*.py: loads through ml_collections' config flags, builds its model, fails loudly."""
from __future__ import annotations

import glob
import os
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from jaxlin.training import optim, train
from jaxlin.config import ModelConfig, model_config_for
from jaxlin.model import count_parameters

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "configs", "*.py"))
                 if not p.endswith("__init__.py"))


def _load(name: str, *overrides: str):
  """The config as run.py gets it: DEFINE_config_file(lock_config=True) + command-line overrides."""
  holder = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=holder, lock_config=True)
  argv = ["run.py", f"--config={os.path.join(REPO, 'configs', name + '.py')}", *overrides]
  saved, sys.argv = sys.argv, argv  # config_flags reads the overrides from sys.argv
  try:
    holder(argv)
  finally:
    sys.argv = saved
  return holder.config


def test_every_config_file_is_covered() -> None:
  assert {"default", "mqar", "gated_deltanet", "mamba2", "mom_gdn", "hybrid",
          "linear_moe_a0_3b_2b", "linear_moe_a1b_7b"} <= set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_is_valid_and_builds_its_model(name: str) -> None:
  config = _load(name)
  module = __import__(f"configs.{name}", fromlist=["get_config"])
  assert f"python run.py --config configs/{name}.py" in module.__doc__, "docstring: the command"
  train.validate_config(config)
  optim.validate(config.optimizer, config.train.num_steps)
  vocab = 8192 if config.data.source == "mqar" else 256
  model_config = model_config_for(config, vocab)
  assert isinstance(model_config, ModelConfig)
  counts = count_parameters(model_config)  # shapes only: the paper sizes allocate nothing
  assert counts.total >= counts.active > 0


def test_paper_configs_have_the_paper_sizes() -> None:
  small, large = _load("linear_moe_a0_3b_2b"), _load("linear_moe_a1b_7b")
  assert (small.model.num_layers, small.model.d_model, small.model.num_experts,
          small.model.moe_top_k, small.model.expert_hidden) == (12, 1024, 64, 8, 896)
  assert (large.model.num_layers, large.model.d_model, large.model.num_heads,
          large.model.expert_hidden) == (16, 2048, 16, 1024)
  for config in (small, large):
    assert config.model.vocab_size == 151936 and config.data.seq_len == 2048
    assert (config.optimizer.learning_rate, config.optimizer.end_learning_rate,
            config.optimizer.b2, config.optimizer.weight_decay, config.optimizer.grad_clip,
            config.model.init_std) == (1e-4, 1e-5, 0.95, 0.1, 1.0, 0.008)


def test_overrides_reach_nested_and_typed_none_fields() -> None:
  config = _load("default", "--config.model.linear_variant=mamba2", "--config.model.window=64",
                 "--config.train.num_steps=7", "--config.logging.tensorboard=False")
  assert config.model.linear_variant == "mamba2" and config.model.window == 64
  assert config.train.num_steps == 7 and config.logging.tensorboard is False


@pytest.mark.parametrize("override,match", [
    ("--config.model.d_modle=64", "d_modle"),        # typo in a field name
    ("--config.trian.num_steps=5", "trian"),        # typo in a group name
    ("--config.train.num_steps=five", "num_steps"),  # wrong type
])
def test_typo_or_bad_type_in_an_override_fails(override: str, match: str) -> None:
  with pytest.raises(Exception, match=match):
    _load("default", override)


@pytest.mark.parametrize("override,match", [
    ("--config.model.linear_variant=gru", r"linear_variant"),
    ("--config.model.pattern=LXN", r"pattern"),
    ("--config.data.seq_len=0", r"data.seq_len"),
    ("--config.optimizer.end_learning_rate=1.0", r"optimizer.end_learning_rate: got 1.0"),
])
def test_invalid_values_name_the_field(tmp_path, override: str, match: str) -> None:
  config = _load("default", override, f"--config.workdir={tmp_path}")
  with pytest.raises(ValueError, match=match):
    train.train(config)

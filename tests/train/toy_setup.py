"""Shared helpers: parse the toy gin files and build/train the toy LM from them."""
import contextlib
import os

import gin

from musiclm_jax import main
from musiclm_jax.data import seqio_input
from musiclm_jax.train import models
from musiclm_jax.train import trainer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOY_GIN = 'examples/toy_lm.gin'


@contextlib.contextmanager
def toy_gin(*bindings: str, gin_file: str = TOY_GIN):
  """The toy experiment's gin config (with extra bindings) for the duration of a block."""
  gin.clear_config(clear_constants=False)
  main.parse_gin([gin_file], ['MODEL_DIR="unused"'] + list(bindings))
  try:
    yield
  finally:
    gin.clear_config(clear_constants=False)


def toy_model():
  """The model the toy gin files describe (call inside `toy_gin`)."""
  return models.DecoderOnlyLM()


def toy_dataset_config(scope: str = 'train'):
  """The toy experiment's DatasetConfig of a gin scope (call inside `toy_gin`)."""
  with gin.config_scope(scope):
    return seqio_input.DatasetConfig()


def train_toy(model_dir, *bindings, **kwargs):
  with toy_gin(*bindings):
    return trainer.train(model_dir=str(model_dir), progress_bar=False, **kwargs)

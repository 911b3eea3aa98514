"""TensorFlow for input pipelines only: logs down, no accelerator (JAX owns those)."""
from __future__ import annotations

import os


def quiet_tensorflow():
  """Imports TensorFlow with its logs down and without any accelerator (JAX owns those).

  The import is lazy on purpose: TensorFlow is heavy (seconds to import, hundreds of MB), and
  only the modules that build input pipelines or write TensorBoard summaries need it.
  """
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    tf.config.set_visible_devices([], 'GPU')
    tf.config.set_visible_devices([], 'TPU')
  except (RuntimeError, ValueError):
    pass  # already initialised, or no such device type
  return tf

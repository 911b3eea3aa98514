"""TensorBoard summaries (scalars, audio, images) written by process 0 only."""
from __future__ import annotations

from typing import Mapping, Optional

import jax
import numpy as np

from musiclm_jax.common.tf_setup import quiet_tensorflow


class SummaryWriter:
  """Writes TensorBoard event files under `logdir`; a no-op on processes other than 0.

  Audio and image hooks are here for the audio models (codec reconstructions, spectrograms).
  """

  def __init__(self, logdir: str, enabled: Optional[bool] = None):
    self.logdir = logdir
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._writer = None
    if self.enabled:
      tf = quiet_tensorflow()
      self._tf = tf
      self._writer = tf.summary.create_file_writer(logdir)

  def scalars(self, step: int, values: Mapping[str, float]):
    if not self._writer:
      return
    with self._writer.as_default():
      for name, value in values.items():
        self._tf.summary.scalar(name, float(value), step=int(step))

  def audio(self, step: int, name: str, waveforms: np.ndarray, sample_rate: int,
            max_outputs: int = 3):
    """waveforms: [batch, samples] or [batch, samples, channels] in [-1, 1]."""
    if not self._writer:
      return
    wav = np.asarray(waveforms, np.float32)
    if wav.ndim == 2:
      wav = wav[..., None]
    with self._writer.as_default():
      self._tf.summary.audio(name, np.clip(wav, -1.0, 1.0), sample_rate, step=int(step),
                             max_outputs=max_outputs)

  def image(self, step: int, name: str, images: np.ndarray, max_outputs: int = 3):
    """images: [batch, height, width, channels] floats in [0, 1] or uint8."""
    if not self._writer:
      return
    with self._writer.as_default():
      self._tf.summary.image(name, np.asarray(images), step=int(step), max_outputs=max_outputs)

  def text(self, step: int, name: str, value: str):
    if not self._writer:
      return
    with self._writer.as_default():
      self._tf.summary.text(name, value, step=int(step))

  def flush(self):
    if self._writer:
      self._writer.flush()

  def close(self):
    if self._writer:
      self._writer.close()
      self._writer = None

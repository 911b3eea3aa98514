"""A look at a prepared corpus: a few examples as wav files and one PNG of log-mels with captions."""
from __future__ import annotations

import os
import re
import textwrap
from typing import Optional

import numpy as np

from musiclm_jax.common import atomic


def _safe_name(text: str) -> str:
  return re.sub(r'[^A-Za-z0-9_.-]+', '_', text).strip('_')[:60] or 'example'


def write_preview(builder, out_dir: str, split: Optional[str] = None, num_examples: int = 6,
                  seconds: Optional[float] = None) -> str:
  """Writes the first examples of a split as wavs plus `preview.png` (log-mel + caption each).

  Args:
    builder: a prepared TFDS builder with the common audio schema (audio, caption, id).
    out_dir: where to write (created; existing files of the same names are replaced atomically).
    split: which split (default: 'train' if present, else the first).
    num_examples: how many examples.
    seconds: plot and write only the first seconds of each clip (None: whole clips).

  Returns:
    the path of the PNG.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  from musiclm_jax.audio import features  # pylint: disable=g-import-not-at-top
  from musiclm_jax.audio.io import save_wav  # pylint: disable=g-import-not-at-top

  splits = sorted(builder.info.splits.keys())
  split = split or ('train' if 'train' in splits else splits[0])
  rate = builder.info.features['audio'].sample_rate
  examples = list(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)
                                .take(num_examples)))
  if not examples:
    raise ValueError(f'{builder.name}: split {split!r} has no examples to preview')
  os.makedirs(out_dir, exist_ok=True)
  front_end = features.LogMelFrontEnd(sample_rate=rate, n_mels=80)
  fig, axes = plt.subplots(len(examples), 1, figsize=(11, 2.3 * len(examples)), squeeze=False)
  for i, (ex, ax) in enumerate(zip(examples, axes[:, 0])):
    audio = ex['audio'].astype(np.float32) / 32768.0
    if seconds is not None:
      audio = audio[:int(seconds * rate)]
    example_id = ex['id'].decode()
    save_wav(os.path.join(out_dir, f'{i:02d}_{_safe_name(example_id)}.wav'), audio, rate)
    mel = np.asarray(front_end(audio))
    ax.imshow(mel.T, origin='lower', aspect='auto', cmap='magma',
              extent=(0, len(audio) / rate, 0, mel.shape[1]))
    caption = ex['caption'].decode() or '(no caption)'
    ax.set_title(f'{example_id}\n' + textwrap.fill(caption, 150), fontsize=7, loc='left')
    ax.set_ylabel('mel bin', fontsize=7)
    ax.tick_params(labelsize=6)
  axes[-1, 0].set_xlabel('seconds', fontsize=7)
  fig.tight_layout()
  try:
    return atomic.write_atomically(os.path.join(out_dir, 'preview.png'),
                                  lambda tmp: fig.savefig(tmp, dpi=110, format='png'),
                                  suffix='.png')
  finally:
    plt.close(fig)

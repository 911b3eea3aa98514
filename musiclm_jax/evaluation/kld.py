"""KL divergence between a tag classifier's posteriors on reference and generated audio (KLD).

MusicLM (Agostinelli et al., 2023, after AudioLM/AudioGen) scores how well generated music keeps
the semantics of its reference with a classifier: for each pair (reference clip, the clip
generated from its caption or prompt) it compares the classifier's label posteriors with
KL(p_reference || p_generated), and reports the mean over pairs. Lower is better; 0 when the
classifier cannot tell the pair apart.

The classifiers are multi-label (sigmoid per tag), so "the distribution" needs a choice:

* 'softmax' (default, the common practice: AudioGen/AudioLDM's `kl_softmax` and audiocraft's
  PaSST KLD): the tag logits are softmax-normalised into one distribution over tags per clip.
  Inputs here are clip-level probabilities (musicnn averages its sigmoid outputs over 3 s
  patches), so the logits are recovered as log(p / (1 - p)); for a one-patch clip this is exactly
  the softmax of the classifier's logits.
* 'bernoulli': each tag is an independent Bernoulli variable and the KL is the sum over tags of
  KL(Bern(p_ref) || Bern(p_gen)): the exact KL between the two product distributions the
  classifier models. It also sees tags that are absent in both clips, which the softmax mostly
  ignores.

Probabilities are clipped to [eps, 1 - eps] so that a confident 0 or 1 gives a large but finite
divergence.
"""
from __future__ import annotations

from typing import Literal

import numpy as np

Mode = Literal['softmax', 'bernoulli']
MODES = ('softmax', 'bernoulli')


def _check_probabilities(probs, name: str) -> np.ndarray:
  array = np.asarray(probs, np.float64)
  if array.ndim != 2:
    raise ValueError(f'{name}: expected [num_clips, num_tags] probabilities, got shape '
                     f'{array.shape}')
  if array.shape[0] == 0 or array.shape[1] == 0:
    raise ValueError(f'{name}: empty probabilities, shape {array.shape}')
  if not np.isfinite(array).all():
    raise ValueError(f'{name}: {int((~np.isfinite(array)).sum())} NaN/inf probabilities')
  if array.min() < 0 or array.max() > 1:
    raise ValueError(f'{name}: probabilities must lie in [0, 1] (sigmoid outputs), got range '
                     f'[{array.min():.4g}, {array.max():.4g}]')
  return array


def per_clip_kl(reference_probs, generated_probs, *, mode: Mode = 'softmax',
                eps: float = 1e-6) -> np.ndarray:
  """KL(p_reference || p_generated) of each pair of clips.

  Args:
    reference_probs: [num_clips, num_tags] tag probabilities (sigmoid outputs, e.g.
      MusicnnEmbedder.tags) of the reference clips.
    generated_probs: the same for the generated clips, row i paired with reference row i.
    mode: 'softmax' or 'bernoulli' (see the module docstring).
    eps: probabilities are clipped to [eps, 1 - eps].

  Returns:
    [num_clips] divergences in nats.
  """
  if mode not in MODES:
    raise ValueError(f'mode={mode!r}; expected one of {MODES}')
  p = _check_probabilities(reference_probs, 'reference_probs')
  q = _check_probabilities(generated_probs, 'generated_probs')
  if p.shape != q.shape:
    raise ValueError(f'reference and generated clips must be paired: shapes {p.shape} and '
                     f'{q.shape} differ')
  p = np.clip(p, eps, 1.0 - eps)
  q = np.clip(q, eps, 1.0 - eps)
  if mode == 'bernoulli':
    return (p * (np.log(p) - np.log(q))
            + (1 - p) * (np.log1p(-p) - np.log1p(-q))).sum(axis=1)

  def log_softmax_of_logits(probs):
    logits = np.log(probs) - np.log1p(-probs)
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))

  log_p, log_q = log_softmax_of_logits(p), log_softmax_of_logits(q)
  return (np.exp(log_p) * (log_p - log_q)).sum(axis=1)


def kl_divergence(reference_probs, generated_probs, *, mode: Mode = 'softmax',
                  eps: float = 1e-6) -> float:
  """KLD: the mean over paired clips of KL(p_reference || p_generated); see per_clip_kl."""
  return float(per_clip_kl(reference_probs, generated_probs, mode=mode, eps=eps).mean())

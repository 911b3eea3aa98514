"""Measuring discontinuities at the joins of windowed generation, against the codec's own.

Generated audio is the SoundStream decoder's output over one code sequence, so it may change
character at any codec frame boundary (every `hop` = 480 samples): that is the codec's own
discontinuity, present in any decoded audio. A join of two decode windows (where a window's
generated tokens begin, with the previous window's tokens as its prefix) is also a codec frame
boundary; it is seamless when it looks like the other boundaries.

The measure, per codec frame boundary b of one clip:

  jump(b) = max |x[n] - x[n-1]| over n in [b - radius, b + radius)
            / RMS of x[n] - x[n-1] over the two frames around b, [b - hop, b + hop)

a local, level-independent size of the biggest step near b (a click, or the decoder state
restarting, stands out against the local RMS of the sample differences; noise-like audio has
jumps of 2 to 4). `join_report` compares the jumps at the join boundaries with those at all
other boundaries of the same clip. Joins that are no worse than the codec's own are
distributed like the other boundaries: the mean percentile rank of a join's jump among the
others' is about 50 (for 21 joins, 50 +- 6), and their mean jump is the others' mean. A seam
shifts both up, and its worst join sits above every other boundary.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def boundary_jumps(audio: np.ndarray, hop: int = 480, radius: int = 8) -> np.ndarray:
  """jump(b) (module docstring) at every inner frame boundary b = k * hop, k = 1 .. frames - 1.

  Args:
    audio: mono samples [samples].
    hop: samples per codec frame.
    radius: samples either side of the boundary searched for the biggest step.

  Returns:
    float64 [frames - 1]: entry k - 1 is the jump at boundary k * hop.
  """
  x = np.asarray(audio, np.float64)
  if x.ndim != 1:
    raise ValueError(f'expected mono samples [samples], got shape {x.shape}')
  diff = np.abs(np.diff(x, prepend=x[:1]))  # diff[n] = |x[n] - x[n-1]|
  frames = len(x) // hop
  out = np.zeros(max(frames - 1, 0))
  for k in range(1, frames):
    b = k * hop
    local = diff[b - hop:b + hop]
    rms = np.sqrt(np.mean(np.square(local))) + 1e-12
    out[k - 1] = np.max(diff[b - radius:b + radius]) / rms
  return out


def join_report(audio: np.ndarray, join_samples: Sequence[int], hop: int = 480,
                radius: int = 8) -> dict[str, float]:
  """Jumps at the joins against the clip's other frame boundaries.

  Args:
    audio: mono samples [samples].
    join_samples: sample positions of the joins (multiples of `hop`, inside the clip).
    hop, radius: as in `boundary_jumps`.

  Returns:
    {'join_mean', 'join_max', 'other_mean', 'other_max', 'other_p99': jumps;
     'mean_join_percentile': the mean percentile rank of the joins' jumps among the other
     boundaries' (about 50 when the joins are like any other boundary);
     'worst_join_percentile': the highest such rank (100: above all of them);
     'joins', 'others': counts}.
  """
  jumps = boundary_jumps(audio, hop, radius)
  index = []
  for s in join_samples:
    if s % hop or not 0 < s // hop < len(jumps) + 1:
      raise ValueError(f'join at sample {s} is not an inner boundary of frames of {hop}')
    index.append(s // hop - 1)
  joins = jumps[index]
  mask = np.ones(len(jumps), bool)
  mask[index] = False
  others = jumps[mask]
  if not len(joins) or not len(others):
    raise ValueError('need at least one join and one other boundary')
  ranks = [100.0 * np.mean(others < j) for j in joins]
  return {'join_mean': float(np.mean(joins)), 'join_max': float(np.max(joins)),
          'mean_join_percentile': float(np.mean(ranks)),
          'other_mean': float(np.mean(others)), 'other_max': float(np.max(others)),
          'other_p99': float(np.percentile(others, 99)),
          'worst_join_percentile': float(max(ranks)), 'joins': int(len(joins)),
          'others': int(len(others))}

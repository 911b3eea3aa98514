"""Log-mel front-end speed on CPU: JAX (jitted) vs librosa, 10 s of 24 kHz audio (a record).

  .venv/bin/python benchmarks/audio_frontend.py [--repeats 20] [--batch 1 8]

LogMelFrontEnd defaults (n_fft 1024, hop 240, 128 mels). Times are medians over `repeats`
calls after a warm-up (compilation excluded); librosa processes a batch one clip at a time.
JAX rows are given for both framing methods of features._frame (on CPU stft uses 'gather').
The machine's cores may be shared: compare rows of one run, not across runs.
"""
import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402  pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # noqa: E402  pylint: disable=g-import-not-at-top
import librosa  # noqa: E402  pylint: disable=g-import-not-at-top
import numpy as np  # noqa: E402  pylint: disable=g-import-not-at-top

from musiclm_jax.audio import features  # noqa: E402  pylint: disable=g-import-not-at-top


def median_ms(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # compile / warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def main_():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--repeats', type=int, default=20)
  parser.add_argument('--batch', type=int, nargs='+', default=[1, 8])
  args = parser.parse_args()
  fe = features.LogMelFrontEnd()
  seconds = 10.0
  rows = []
  for batch in args.batch:
    x = np.random.default_rng(0).standard_normal(
        (batch, int(seconds * fe.sample_rate))).astype(np.float32)

    def librosa_fn(audio):
      return [np.log(np.maximum(librosa.feature.melspectrogram(
          y=a, sr=fe.sample_rate, n_fft=fe.n_fft, hop_length=fe.hop_length, n_mels=fe.n_mels),
                                fe.log_floor)) for a in audio]

    rows.append((batch, 'librosa (numpy, per clip)', median_ms(librosa_fn, x,
                                                               repeats=args.repeats)))
    original = features._frame
    for method in ('gather', 'slices'):
      features._frame = lambda a, n, h, m=None, method=method: original(a, n, h, method)
      fwd = jax.jit(fe.__call__)
      grad = jax.jit(jax.grad(lambda a: jnp.sum(fe(a))))
      name = f'jax jit, {method} framing'
      rows.append((batch, name, median_ms(fwd, x, repeats=args.repeats)))
      rows.append((batch, name + ', fwd+grad', median_ms(grad, x, repeats=args.repeats)))
    features._frame = original
  print(f'log-mel, {seconds:.0f} s at {fe.sample_rate} Hz, n_fft {fe.n_fft}, hop '
        f'{fe.hop_length}, {fe.n_mels} mels; {jax.devices()[0].platform}, '
        f'{os.cpu_count()} CPU cores')
  print(f'{"batch":>5}  {"implementation":<40} {"ms":>8} {"x realtime":>11}')
  for batch, name, ms in rows:
    print(f'{batch:>5}  {name:<40} {ms:>8.1f} {batch * seconds * 1e3 / ms:>10.0f}x')


if __name__ == '__main__':
  main_()

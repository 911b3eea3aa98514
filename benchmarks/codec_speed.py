"""SoundStream encode / decode speed on this machine: 10 s of 24 kHz audio, jitted, after warm-up.

  .venv/bin/python benchmarks/codec_speed.py [--repeats 3] [--seconds 10] [--channels 16 32 37]
      [--fourier 192x6 368x8]

`--channels`: SEANet codecs of those base widths (SoundStream's architecture). `--fourier DxL`:
the Fourier encoder and decoder (codec/fourier.py) of width D and L ConvNeXt blocks each, with
the tiny codec's 16-dimensional latent (192x6 is models/codec/tiny.gin; 368x8 has EnCodec's
parameter count).

One clip (batch 1), all 12 RVQ levels of 1024 codes; times are medians over `repeats` calls
after a warm-up call (compilation excluded). Parameters count the encoder and decoder (the
codebooks are state, 1.6M numbers, not parameters). Reference on this machine (measured
separately, PyTorch): EnCodec 24 kHz, 14.9M parameters, encodes 10 s in 0.38 s (26x real time)
and decodes in 0.42 s (24x). The machine's cores may be shared: compare rows of one run.
"""
import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402  pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # noqa: E402  pylint: disable=g-import-not-at-top
import numpy as np  # noqa: E402  pylint: disable=g-import-not-at-top

from musiclm_jax.codec import SoundStream  # noqa: E402  pylint: disable=g-import-not-at-top
from musiclm_jax.nn import count_params  # noqa: E402  pylint: disable=g-import-not-at-top


def median_s(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # compile / warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def gflops(jitted, *args) -> float:
  """XLA's count of floating-point operations of one call, in units of 1e9."""
  cost = jitted.lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get('flops', float('nan'))) / 1e9


def fourier_codec(dim: int, layers: int) -> SoundStream:
  """The Fourier encoder / decoder codec of models/codec/tiny.gin with other widths."""
  return SoundStream(encoder_type='fourier', decoder_type='fourier', fourier_dim=dim,
                     fourier_layers=layers, embedding_dim=16)


def measure(channels: int, seconds: float = 10.0, repeats: int = 3,
            model: SoundStream = None) -> dict:
  """Encode and decode times of one `seconds`-long clip with `SoundStream(channels=...)`
  (or with `model` when given).

  Returns a dict: params (encoder and decoder), encode_s and decode_s (medians over `repeats`
  jitted calls after a warm-up call), encode_gflop and decode_gflop (XLA's counts).
  """
  model = SoundStream(channels=channels) if model is None else model
  samples = int(seconds * model.sample_rate)
  audio = jnp.asarray(np.random.default_rng(0).standard_normal((1, samples)) * 0.1,
                      jnp.float32)
  variables = jax.jit(lambda a: model.init({'params': jax.random.key(0)}, a[:, :4800],
                                           train=False))(audio)
  encode = jax.jit(lambda v, a: model.apply(v, a, method=SoundStream.encode))
  decode = jax.jit(lambda v, c: model.apply(v, c, method=SoundStream.decode))
  codes = encode(variables, audio)
  return {
      'params': count_params(variables['params']),
      'encode_s': median_s(encode, variables, audio, repeats=repeats),
      'decode_s': median_s(decode, variables, codes, repeats=repeats),
      'encode_gflop': gflops(encode, variables, audio),
      'decode_gflop': gflops(decode, variables, codes),
  }


def main_():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--seconds', type=float, default=10.0)
  parser.add_argument('--channels', type=int, nargs='*', default=[16, 32, 37])
  parser.add_argument('--fourier', nargs='*', default=[], metavar='DxL')
  args = parser.parse_args()
  configs = [(f'channels={c}', SoundStream(channels=c)) for c in args.channels]
  for spec in args.fourier:
    dim, layers = (int(x) for x in spec.split('x'))
    configs.append((f'fourier {spec}', fourier_codec(dim, layers)))
  rows = []
  for name, model in configs:
    m = measure(0, args.seconds, args.repeats, model=model)
    rows.append((name, m['params'], m['encode_gflop'], m['encode_s'],
                 m['decode_gflop'], m['decode_s']))
  print(f'SoundStream, {args.seconds:g} s at 24 kHz, 12 x 1024 RVQ (6 kbps), batch 1; '
        f'{jax.devices()[0].platform}, {os.cpu_count()} CPU cores, {jax.device_count()} devices')
  print(f'{"config":<14} {"params":>7} | {"enc GFLOP":>9} {"enc s":>6} {"x realtime":>10} | '
        f'{"dec GFLOP":>9} {"dec s":>6} {"x realtime":>10}')
  for name, params, enc_gf, enc_s, dec_gf, dec_s in rows:
    print(f'{name:<14} {params / 1e6:>6.1f}M | {enc_gf:>9.0f} {enc_s:>6.3f} '
          f'{args.seconds / enc_s:>9.1f}x | {dec_gf:>9.0f} {dec_s:>6.3f} '
          f'{args.seconds / dec_s:>9.1f}x')


if __name__ == '__main__':
  main_()

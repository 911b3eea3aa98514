"""Codec quality and speed: a trained codec at 1.5 / 3 / 6 kbps vs Opus at the same bitrates.

On clips of the embedded corpus's test split (10 s, 24 kHz), prints one table: multi-scale mel
distance and SI-SNR against the input (lower / higher is better), for the input itself (the
metrics' floor), Opus (opusenc --hard-cbr, opusdec --rate 24000) and the codec with 3, 6 and 12
RVQ levels (with --fad also musicnn FAD of each row against real clips: the input row is the
real-vs-real floor); then the codec's encode and decode speed on this machine (x real time, 10 s, jitted,
after warm-up).

Opus comes from Debian's opus-tools: `sudo apt-get install opus-tools`.

  .venv/bin/python benchmarks/codec_quality.py --model_dir=runs/codec_tiny \
    --tfds_data_dir=~/tensorflow_datasets --num_clips=30
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

BITRATES_KBPS = (1.5, 3.0, 6.0)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--model_dir', required=True)
  parser.add_argument('--step', type=int, default=None)
  parser.add_argument('--tfds_data_dir', default=None)
  parser.add_argument('--split', default='test')
  parser.add_argument('--num_clips', type=int, default=30)
  parser.add_argument('--batch', type=int, default=6)
  parser.add_argument('--json', default=None, help='also write the table here')
  parser.add_argument('--fad', action='store_true',
                      help='also musicnn FAD of each row: real half A vs the row\'s clips of '
                           'half B (the input row: real A vs real B, the floor)')
  args = parser.parse_args(argv)
  tfds_data_dir = os.path.expanduser(args.tfds_data_dir) if args.tfds_data_dir else None

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from musiclm_jax.audio import opus  # pylint: disable=g-import-not-at-top
  from musiclm_jax.codec import model as codec_model  # pylint: disable=g-import-not-at-top
  from musiclm_jax.evaluation import codec_report  # pylint: disable=g-import-not-at-top

  model, params, model_state, step = codec_model.load_codec(args.model_dir, args.step)
  rate = model.sample_rate
  # Whole clips (10 s) of the split, as codec_report reads them.
  clips = codec_report.corpus_clips(args.split, tfds_data_dir, 10.0, args.num_clips, rate)
  n_params = sum(x.size for x in jax.tree_util.tree_leaves(params['generator']))

  metric_fn = codec_report.metrics_fn(rate)
  codec_fns = {}
  for kbps in BITRATES_KBPS:
    n = int(round(kbps * 1000 / model.generator.bitrate(1)))
    codec_fns[kbps] = (n, jax.jit(lambda a, n=n: model.reconstruct(params, model_state, a,
                                                                   n)['audio']))

  embedder = None
  if args.fad:
    from musiclm_jax.evaluation import frechet  # pylint: disable=g-import-not-at-top
    from musiclm_jax.evaluation import musicnn  # pylint: disable=g-import-not-at-top
    embedder = musicnn.default_embedder()
    half = len(clips) // 2
    reference = embedder.clip_outputs(list(clips[:half])).embeddings

  def fad_of(estimates: np.ndarray) -> float:
    if embedder is None:
      return float('nan')
    return float(frechet.fad(reference,
                             embedder.clip_outputs(list(estimates[half:2 * half])).embeddings))

  def score(estimates: np.ndarray):
    return (*codec_report.score(metric_fn, clips, estimates, args.batch), fad_of(estimates))

  rows = [('input itself', '-', *score(clips))]
  have_opus = opus.available()
  for kbps in BITRATES_KBPS:
    if have_opus:
      rows.append((f'Opus {kbps:g} kbps', f'{kbps:g}',
                   *score(np.stack([opus.roundtrip(c, rate, kbps) for c in clips]))))
    n, fn = codec_fns[kbps]
    recon = np.concatenate([np.asarray(fn(jnp.asarray(clips[i:i + args.batch])))
                            for i in range(0, len(clips), args.batch)])
    rows.append((f'codec {n} levels', f'{model.generator.bitrate(n) / 1000:g}', *score(recon)))
  if not have_opus:
    print('opusenc/opusdec not found (apt-get install opus-tools): Opus rows left out',
          file=sys.stderr)

  # Speed: 10 s of audio, batch 1, all levels, jitted, timed after a warm-up call.
  ten = jnp.asarray(clips[:1, :10 * rate])
  variables = model.generator_variables(params, model_state)
  enc = jax.jit(lambda a: model.generator.apply(variables, a, method=type(model.generator).encode))
  dec = jax.jit(lambda c: model.generator.apply(variables, c, method=type(model.generator).decode))
  codes = jax.block_until_ready(enc(ten))
  jax.block_until_ready(dec(codes))
  timings = {}
  for name, fn, arg in (('encode', enc, ten), ('decode', dec, codes)):
    best = float('inf')
    for _ in range(5):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(arg))
      best = min(best, time.perf_counter() - t0)
    timings[name] = 10.0 / best

  print(f'codec {args.model_dir} step {step}: generator {n_params / 1e6:.2f}M parameters; '
        f'{len(clips)} clips of {clips.shape[1] / rate:g} s from embedded_music/{args.split}; '
        f'{jax.device_count()} x {jax.devices()[0].platform}')
  print(f'{"system":<20}{"kbps":>6}{"mel distance":>14}{"SI-SNR dB":>11}'
        + (f'{"FAD musicnn":>13}' if args.fad else ''))
  for name, kbps, dist, snr, fad in rows:
    snr_text = f'{snr:>11.2f}' if np.isfinite(snr) and snr < 200 else f'{"inf":>11}'
    print(f'{name:<20}{kbps:>6}{dist:>14.3f}{snr_text}' + (f'{fad:>13.2f}' if args.fad else ''))
  print(f'encode {timings["encode"]:.1f}x real time, decode {timings["decode"]:.1f}x real time '
        '(10 s, batch 1, all levels)')
  if args.json:
    with open(args.json, 'w', encoding='utf-8') as f:
      json.dump({'step': step, 'rows': rows, 'speed_x_realtime': timings,
                 'generator_params': n_params}, f, indent=2)
  return 0


if __name__ == '__main__':
  sys.exit(main())

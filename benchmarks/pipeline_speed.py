"""Text-to-music speed of a pipeline folder: tokens/s per stage, compute seconds per audio second.

  nice -n 19 .venv/bin/python benchmarks/pipeline_speed.py --checkpoint runs/pipeline_tiny \
    [--seconds 10] [--batch 1] [--repeats 2] [--progress]

Loads the folder once, generates once to compile (that call's time is printed apart), then
times `--repeats` generations of `--seconds` of audio from one caption (a new seed each) and
prints the median per part: the semantic, coarse and fine stages (tokens generated over the
batch rows, tokens/s, guidance rows and the fine stage's batched chunks included in the time,
not in the token count) and the codec decode, and the whole as seconds of compute per second of
audio (below 1: faster than real time). `--progress` drives the decoders in chunks that report
to progress bars, as `musiclm-jax sample` does (a little slower); the default decodes each
window in one call. The machine's cores may be shared with other jobs: compare rows of one run.
"""
import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import numpy as np  # noqa: E402  pylint: disable=g-import-not-at-top

PARTS = ('semantic', 'coarse', 'fine', 'codec_decode')


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--checkpoint', default='runs/pipeline_tiny')
  parser.add_argument('--prompt', default='a calm piano melody, slow tempo')
  parser.add_argument('--seconds', type=float, default=10.0)
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--repeats', type=int, default=2)
  parser.add_argument('--mesh_shape', default=None)
  parser.add_argument('--progress', action='store_true')
  args = parser.parse_args()

  from musiclm_jax.generate import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top
  from musiclm_jax.main import setup_compilation_cache  # pylint: disable=g-import-not-at-top
  setup_compilation_cache()
  import jax  # pylint: disable=g-import-not-at-top

  t = time.perf_counter()
  pipe = pipeline_lib.Pipeline.load(args.checkpoint,
                                    mesh_shape=pipeline_lib.parse_mesh_shape(args.mesh_shape))
  load_s = time.perf_counter() - t

  def generate(seed):
    return pipe.generate_tokens(args.prompt, args.seconds, seed=seed, num_samples=args.batch,
                                progress=args.progress)

  t = time.perf_counter()
  first = generate(0)
  first_s = time.perf_counter() - t
  runs = [generate(1 + i) for i in range(args.repeats)]
  audio_s = args.batch * args.seconds
  print(f'{args.checkpoint}: {jax.device_count()} x {jax.devices()[0].device_kind}, '
        f'{args.seconds:g} s x batch {args.batch}; load {load_s:.1f} s, first call (compiling) '
        f'{first_s:.1f} s; median of {args.repeats} warm calls:')
  print(pipe.describe())
  print()
  print('| part | tokens | seconds | tokens/s | s per audio s |')
  print('|---|---:|---:|---:|---:|')
  total = 0.0
  for part in PARTS:
    seconds = float(np.median([r.timings[part] for r in runs]))
    total += seconds
    tokens = first.tokens.get(part, 0)
    rate = f'{tokens / seconds:,.0f}' if tokens else '-'
    print(f'| {part} | {tokens:,} | {seconds:.2f} | {rate} | {seconds / audio_s:.3f} |')
  tokens = sum(first.tokens.values())
  print(f'| **all** | {tokens:,} | {total:.2f} | {tokens / total:,.0f} | '
        f'**{total / audio_s:.3f}** |')


if __name__ == '__main__':
  main()

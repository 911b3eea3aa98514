"""KV-cache sampling speed of a stage-LM-like Decoder on this machine: tokens/s at batch 1.

  nice -n 19 .venv/bin/python benchmarks/sampling.py [--lengths 250 500 1000] [--repeats 3]

Model: width 256, 4 layers, 8 heads of 32, MLP 1024, T5 relative position bias, vocabulary
1024 (random weights: speed does not depend on them). Each row decodes `length` tokens after
a 16-token prompt with `generate.decode` (prefill + the whole sampling loop in one jitted
call): temperature 1 with top-k 50 (the sort of the vocabulary included), greedy, and with
--steps-per-call the chunked loop a progress bar would drive. Times are medians over
`repeats` calls after a warm-up call (compilation excluded), tokens/s = length / time.

Every step attends over the whole cache (prompt + length slots, the unfilled ones masked),
and XLA:CPU transposes the [batch, length, heads, head_dim] keys and values for the attention
dots, so a step's cost has a part that grows with the cache: tokens/s falls for long
lengths. The machine's cores may be shared with other jobs: compare rows of one run.
"""
import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402  pylint: disable=g-import-not-at-top
import numpy as np  # noqa: E402  pylint: disable=g-import-not-at-top

from musiclm_jax import generate  # noqa: E402  pylint: disable=g-import-not-at-top
from musiclm_jax.nn import count_params  # noqa: E402  pylint: disable=g-import-not-at-top
from musiclm_jax.nn import transformer  # noqa: E402  pylint: disable=g-import-not-at-top

CONFIG = transformer.TransformerConfig(
    vocab_size=1024, embed_dim=256, num_layers=4, num_heads=8, head_dim=32, mlp_dim=1024)
PROMPT_LENGTH = 16


def median_s(fn, repeats: int) -> float:
  jax.block_until_ready(fn())  # compile / warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def main_():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--lengths', type=int, nargs='+', default=[250, 500, 1000])
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--steps-per-call', type=int, default=None,
                      help='also time the chunked loop (one jitted call per this many steps)')
  args = parser.parse_args()
  model = transformer.Decoder(CONFIG)
  prompt = jax.random.randint(jax.random.key(1), (args.batch, PROMPT_LENGTH), 1,
                              CONFIG.vocab_size)
  params = jax.jit(model.init)(jax.random.key(0), prompt)['params']
  print(f'{jax.device_count()} x {jax.devices()[0].platform}, batch {args.batch}, prompt '
        f'{PROMPT_LENGTH}, {count_params(params) / 1e6:.2f}M parameters')
  print(f'{"tokens":>7} {"mode":>20} {"seconds":>8} {"tokens/s":>9}')
  for length in args.lengths:
    modes = [('top-k 50, T=1', dict(temperature=1.0, top_k=50)),
             ('greedy', dict(temperature=0.0))]
    if args.steps_per_call:
      modes.append((f'top-k, {args.steps_per_call}/call',
                    dict(temperature=1.0, top_k=50, steps_per_call=args.steps_per_call)))
    for mode, settings in modes:
      run = lambda s=settings, n=length: generate.decode(  # pylint: disable=g-long-lambda
          model, params, prompt, n, jax.random.key(2), **s)
      seconds = median_s(run, args.repeats)
      print(f'{length:>7} {mode:>20} {seconds:>8.3f} {length / seconds:>9.0f}', flush=True)


if __name__ == '__main__':
  main_()

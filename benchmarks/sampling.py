"""KV-cache sampling speed of a stage-LM-like Decoder on this machine: tokens/s at batch 1.

  nice -n 19 .venv/bin/python benchmarks/sampling.py [--lengths 250 500 1000 2000]
      [--repeats 3] [--no-before] [--steps-per-call 64] [--config anchor|paper]

Model (--config anchor, the default): width 256, 4 layers, 8 heads of 32, MLP 1024, T5 relative
position bias, vocabulary 1024 (random weights: speed does not depend on them); --config paper
is the paper's ~430M stage in bfloat16, for an accelerator. Each row decodes `length` tokens after
a 16-token prompt with `generate.decode`: temperature 1 with top-k 50 (the sort of the
vocabulary included), greedy, and with --steps-per-call the chunked loop a progress bar would
drive. Times are medians over `repeats` calls after a warm-up call (compilation excluded;
the warm-up's own time is shown as "1st s"), tokens/s = length / time.

Two cache strategies are timed side by side, on the same model and prompt:

  now     The cache starts at 256 positions and doubles as tokens fill it (256, 512, 1024,
          ..., up to prompt + length: `decoding.cache_lengths`); a step attends over the
          current cache (the unfilled slots masked), so over fewer than twice the positions
          filled, and a step's cost follows the length decoded so far. The cache is packed,
          [batch * heads, length, head_dim]: the attention dots read the cache buffers as
          they are, and each step writes its key and value in place.
  before  The cache is allocated whole at the start (prompt + length positions) in the
          head-major layout [batch, heads, length, head_dim], as the decode path did before
          (there: [batch, length, heads, head_dim]): every step attends over all of it, and
          XLA:CPU copies the keys and values of every layer on every step to lay them out
          for its dots. Its cost per step grows with the allocated cache, so tokens/s falls
          for long lengths.

"x" is the ratio of tokens/s, now / before, within this run. The machine's cores may be
shared with other jobs: compare rows of one run.
"""
import argparse
import contextlib
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402  pylint: disable=g-import-not-at-top
import numpy as np  # noqa: E402  pylint: disable=g-import-not-at-top

from musiclm_jax import generate  # noqa: E402  pylint: disable=g-import-not-at-top
from musiclm_jax.generate import decoding  # noqa: E402  pylint: disable=g-import-not-at-top
from musiclm_jax.nn import count_params  # noqa: E402  pylint: disable=g-import-not-at-top
from musiclm_jax.nn import transformer  # noqa: E402  pylint: disable=g-import-not-at-top
import stage_training  # noqa: E402  pylint: disable=g-import-not-at-top  (benchmarks/, beside this file)

# The anchor shape of the peers' figures and the paper's stage (bfloat16 compute: for an
# accelerator); the training benchmark's remat setting does not touch decoding.
CONFIGS = stage_training.CONFIGS
PROMPT_LENGTH = 16


@contextlib.contextmanager
def cache_strategy(name: str):
  """'now': the defaults; 'before': the whole cache at once, head-major."""
  saved = decoding.FIRST_CACHE_LENGTH, decoding.PACK_CACHE
  if name == 'before':
    decoding.FIRST_CACHE_LENGTH, decoding.PACK_CACHE = sys.maxsize, False
  try:
    yield
  finally:
    decoding.FIRST_CACHE_LENGTH, decoding.PACK_CACHE = saved


def time_s(fn, repeats: int) -> tuple[float, float]:
  """(seconds of the warm-up call, median seconds of `repeats` further calls)."""
  start = time.perf_counter()
  jax.block_until_ready(fn())  # compile / warm up
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return first, float(np.median(times))


def measure(config: str | transformer.TransformerConfig = 'anchor', length: int = 500,
            repeats: int = 3, batch: int = 1, strategy: str = 'now',
            temperature: float = 1.0, top_k: int | None = 50,
            steps_per_call: int | None = None) -> dict:
  """KV-cache sampling speed of one setting, as a row of the table `main_` prints.

  Decodes `length` tokens after a PROMPT_LENGTH-token prompt with `generate.decode` (random
  weights) of a Decoder of `config` (a name in CONFIGS or a TransformerConfig); returns a dict
  with params, first_s (the warm-up call, compilation included), seconds (median of `repeats`
  further calls) and tokens_per_s = length / seconds.
  """
  if isinstance(config, str):
    config = CONFIGS[config]
  model = transformer.Decoder(config)
  prompt = jax.random.randint(jax.random.key(1), (batch, PROMPT_LENGTH), 1, config.vocab_size)
  params = jax.jit(model.init)(jax.random.key(0), prompt)['params']
  settings = dict(temperature=temperature)
  if temperature > 0 and top_k:
    settings['top_k'] = top_k
  if steps_per_call:
    settings['steps_per_call'] = steps_per_call
  run = lambda: generate.decode(model, params, prompt, length, jax.random.key(2), **settings)
  with cache_strategy(strategy):
    first, seconds = time_s(run, repeats)
  return {'params': count_params(params), 'first_s': first, 'seconds': seconds,
          'tokens_per_s': length / seconds}


def main_():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--lengths', type=int, nargs='+', default=[250, 500, 1000, 2000])
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--steps-per-call', type=int, default=None,
                      help='also time the chunked loop (one jitted call per this many steps)')
  parser.add_argument('--no-before', dest='before', action='store_false',
                      help="time only the current cache strategy (not 'before')")
  parser.add_argument('--config', choices=sorted(CONFIGS), default='anchor',
                      help="the decoder's sizes: 'anchor' (default) or 'paper' (~430M)")
  args = parser.parse_args()
  config = CONFIGS[args.config]
  model = transformer.Decoder(config)
  prompt = jax.random.randint(jax.random.key(1), (args.batch, PROMPT_LENGTH), 1,
                              config.vocab_size)
  params = jax.jit(model.init)(jax.random.key(0), prompt)['params']
  strategies = ['before', 'now'] if args.before else ['now']
  print(f'{args.config}: {jax.device_count()} x {jax.devices()[0].device_kind}, batch {args.batch}, prompt '
        f'{PROMPT_LENGTH}, {count_params(params) / 1e6:.2f}M parameters')
  print(f'{"tokens":>7} {"mode":>20} {"cache":>7} {"1st s":>6} {"seconds":>8} '
        f'{"tokens/s":>9} {"x":>6}')
  for length in args.lengths:
    modes = [('top-k 50, T=1', dict(temperature=1.0, top_k=50)),
             ('greedy', dict(temperature=0.0))]
    if args.steps_per_call:
      modes.append((f'top-k, {args.steps_per_call}/call',
                    dict(temperature=1.0, top_k=50, steps_per_call=args.steps_per_call)))
    for mode, settings in modes:
      speeds = {}
      for strategy in strategies:
        run = lambda s=settings, n=length: generate.decode(  # pylint: disable=g-long-lambda
            model, params, prompt, n, jax.random.key(2), **s)
        with cache_strategy(strategy):
          first, seconds = time_s(run, args.repeats)
        speeds[strategy] = length / seconds
        ratio = (f'{speeds["now"] / speeds["before"]:>5.2f}x'
                 if strategy == 'now' and 'before' in speeds else '')
        print(f'{length:>7} {mode:>20} {strategy:>7} {first:>6.1f} {seconds:>8.3f} '
              f'{speeds[strategy]:>9.0f} {ratio:>6}', flush=True)


if __name__ == '__main__':
  main_()

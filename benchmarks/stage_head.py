"""The stage LMs' training loss with the level head against the masked whole-vocabulary head.

  nice -n 19 .venv/bin/python benchmarks/stage_head.py [--stages semantic coarse fine] [--steps 5]
      [--attention_block_size 128]   # 0: the dense attention, for a before / after

Each row times the jitted loss and gradient of `StageModel.compute_losses` (no optimizer) at the
tiny recipe's shapes (models/stages/tiny.gin: d128, 3 layers, 4 heads, MLP 512, no dropout;
the tiny token sizes; batch 8 of the stage's crop: semantic 10 s, coarse 2 s, fine 1 s) on a
random batch with the stage's layout, two ways:

  level head   `level_softmax=True`: each predicted position read out over its level's
               codebook only (`StageModel.level_logits`)
  masked full  the same loss through the whole-vocabulary read-out, masked to the level
               (`StageModel.restrict_logits`: the computation before the level head)

Both give the same loss (printed); the table shows milliseconds per loss + gradient (median of
`--steps` after one warm-up) and predicted tokens per second.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402  pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # noqa: E402  pylint: disable=g-import-not-at-top
import numpy as np  # noqa: E402  pylint: disable=g-import-not-at-top

from musiclm_jax.nn.transformer import TransformerConfig  # noqa: E402  pylint: disable=g-import-not-at-top
from musiclm_jax.stages import spec as spec_lib  # noqa: E402  pylint: disable=g-import-not-at-top
from musiclm_jax.stages.model import StageModel  # noqa: E402  pylint: disable=g-import-not-at-top
from musiclm_jax.train.models import cross_entropy_with_integer_labels  # noqa: E402  pylint: disable=g-import-not-at-top

SIZES = spec_lib.TokenSizes(semantic_codes=128, codec_levels=12, codec_codes=1024,
                            coarse_levels=4, mulan_levels=12, mulan_codes=64, melody_levels=24,
                            melody_codes=64, melody_frames=3)
CONFIG = TransformerConfig(vocab_size=0, embed_dim=128, num_layers=3, num_heads=4, head_dim=32,
                           mlp_dim=512, dropout_rate=0.0)
CROPS = {'semantic': 10.0, 'coarse': 2.0, 'fine': 1.0}
Z_LOSS = 1e-4


def random_batch(spec: spec_lib.StageSpec, crop: float, batch: int, seed: int = 0):
  """A PrefixLM batch with the stage's layout: random valid ids, loss on the predicted part."""
  rng = np.random.default_rng(seed)
  lengths = spec.feature_lengths(crop)
  prefix, predicted = lengths['inputs'], lengths['targets']
  length = prefix + predicted
  target = spec.target
  targets = np.zeros((batch, length), np.int32)
  targets[:, :prefix] = rng.integers(1, spec.offset(target.name), (batch, prefix))
  offsets = spec.level_offsets(target.name)
  targets[:, prefix:] = (offsets[np.arange(predicted) % spec.period]
                         + rng.integers(0, target.codebook_size, (batch, predicted)))
  inputs = np.zeros_like(targets)
  inputs[:, 1:] = targets[:, :-1]
  weights = np.zeros_like(targets)
  weights[:, prefix:] = 1
  return {'decoder_input_tokens': jnp.asarray(inputs),
          'decoder_target_tokens': jnp.asarray(targets),
          'decoder_loss_weights': jnp.asarray(weights)}, predicted


def timed(fn, args, steps: int) -> tuple[float, float]:
  value, grads = fn(*args)
  jax.block_until_ready(grads)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    value, grads = fn(*args)
    jax.block_until_ready(grads)
    times.append(time.perf_counter() - start)
  return float(np.median(times)), float(value)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--stages', nargs='+', default=list(CROPS), choices=list(CROPS))
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--attention_block_size', type=int, default=CONFIG.attention_block_size,
                      help='TransformerConfig.attention_block_size (0: dense attention)')
  args = parser.parse_args()
  config = dataclasses.replace(CONFIG, attention_block_size=args.attention_block_size)
  print(f'jax {jax.__version__}, {jax.device_count()} x {jax.devices()[0].platform}; '
        f'attention_block_size {args.attention_block_size}\n')
  print('| stage | batch x length | vocabulary / level codes | head | loss | ms per loss + grad '
        '| predicted tokens/s | speed-up |')
  print('|---|---|---|---|---:|---:|---:|---:|')
  for name in args.stages:
    spec = spec_lib.STAGE_SPECS[name](SIZES)
    batch, predicted = random_batch(spec, CROPS[name], args.batch)
    model = StageModel(spec, config, z_loss=Z_LOSS)
    params = {'model': model.module.init(jax.random.PRNGKey(0),
                                         batch['decoder_input_tokens'][:1])['params']}

    def level_head(p, b, model=model):
      return model.compute_losses(p, {}, b, jax.random.PRNGKey(1))[0]['model']

    def masked_full(p, b, model=model):
      targets = b['decoder_target_tokens']
      logits = model.restrict_logits(model.logits(p, b), targets)
      total, _, weight = cross_entropy_with_integer_labels(
          logits, targets, model.loss_weights(b), Z_LOSS)
      return total / weight

    rows = []
    for head, fn in (('level head', level_head), ('masked full', masked_full)):
      seconds, loss = timed(jax.jit(jax.value_and_grad(fn)), (params, batch), args.steps)
      rows.append((head, seconds, loss))
    shape = f'{args.batch} x {batch["decoder_input_tokens"].shape[1]}'
    sizes = f'{model.config.vocab_size} / {spec.target.codebook_size}'
    for head, seconds, loss in rows:
      speedup = rows[1][1] / seconds
      print(f'| {name} | {shape} | {sizes} | {head} | {loss:.4f} | {seconds * 1e3:,.0f} | '
            f'{args.batch * predicted / seconds:,.0f} | {speedup:.2f}x |')


if __name__ == '__main__':
  main()

"""Stage-LM training throughput and MFU of our real train step, on whatever JAX sees.

  nice -n 19 .venv/bin/python benchmarks/stage_training.py                  # the CPU anchor shape
  python benchmarks/stage_training.py --config paper --batch 16 --length 2048   # on a GPU/TPU

The step is the trainer's own (`StepFunctions.train_step`: forward, backward, AdamW with
gradient clipping and the skip-non-finite guard, sharded by a `Partitioner` over every device
on a data-parallel mesh) on a `DecoderOnlyLM` with T5 relative position bias. Configs:

  anchor  d256, 4 layers, 8 heads of 32, MLP 1024 (gelu), vocab 1024, float32: the shape the
          peers were measured at (audiolm-pytorch 2.4.0: 833 tokens/s; a minimal eager PyTorch
          decoder: 3,864 tokens/s, on 2 CPU cores at batch 4 x 1024).
  paper   the paper's stage: d1024, 24 layers, 16 heads of 64, gated-GELU MLP 4096, vocab 2176
          (the coarse stage's, rounded), bfloat16 compute, scanned layers, remat
          'dots_with_no_batch_dims_saveable' (gin_configs/models/stages/paper.gin), ~430M
          parameters.

tokens/s counts every position of the batch (batch x length) per second of step time, the
median over `--steps` timed steps after two warm-up steps (compilation excluded). FLOPs per step
are counted analytically (model FLOPs: 6 x matmul parameters x tokens plus causal attention,
no remat recompute) and MFU = model FLOP/s / `--peak_tflops` (given on the command line: e.g.
989 for an H100/H200 SXM's dense bf16; on a CPU, the matmul peak measured by `--measure_peak`).
XLA's cost analysis of the compiled step is printed beside it as a check; it counts a scanned
layer stack's body once, so it is far below the model FLOPs for `--scan` configs. `--remat`,
`--scan`, `--dtype` and `--attention_block_size` (0: the dense attention) override the
config's. Prints one Markdown table; `--json` writes the row.
"""
import argparse
import dataclasses
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402  pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # noqa: E402  pylint: disable=g-import-not-at-top
import numpy as np  # noqa: E402  pylint: disable=g-import-not-at-top

from musiclm_jax.nn import transformer  # noqa: E402  pylint: disable=g-import-not-at-top
from musiclm_jax.train.models import DecoderOnlyLM  # noqa: E402  pylint: disable=g-import-not-at-top
from musiclm_jax.train.optimizers import OptimizerConfig  # noqa: E402  pylint: disable=g-import-not-at-top
from musiclm_jax.train.partitioning import Partitioner  # noqa: E402  pylint: disable=g-import-not-at-top
from musiclm_jax.train.train_state import StepFunctions  # noqa: E402  pylint: disable=g-import-not-at-top

CONFIGS = {
    'anchor': transformer.TransformerConfig(
        vocab_size=1024, embed_dim=256, num_layers=4, num_heads=8, head_dim=32, mlp_dim=1024),
    'paper': transformer.TransformerConfig(
        vocab_size=2176, embed_dim=1024, num_layers=24, num_heads=16, head_dim=64,
        mlp_dim=4096, activation='gated_gelu', dtype=jnp.bfloat16, scan_layers=True,
        remat_policy='dots_with_no_batch_dims_saveable'),
}


def flops_of(compiled) -> float:
  """FLOPs of one call from XLA's cost analysis (0 when the backend gives none)."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return 0.0
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get('flops', 0.0))


def analytic_flops(config: transformer.TransformerConfig, batch: int, length: int) -> float:
  """Model FLOPs of a step: 6 x matmul parameters x tokens + 3 x causal attention's forward."""
  d, h = config.embed_dim, config.num_heads * config.head_dim
  mlp_mats = 3 if config.activation.startswith('gated') else 2
  per_layer = 4 * d * h + mlp_mats * d * config.mlp_dim
  n = config.num_layers * per_layer + d * config.vocab_size
  tokens = batch * length
  attention = config.num_layers * 2 * 2 * length * h * tokens / 2  # QK^T and AV, causal half
  return 6.0 * n * tokens + 3.0 * attention


def measure_matmul_peak(dtype=jnp.float32, n: int = 1024, repeats: int = 10) -> float:
  """Measured FLOP/s of an n x n x n matmul on the default device."""
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  jax.block_until_ready(f(a))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(f(a))
    times.append(time.perf_counter() - t)
  return 2 * n ** 3 / float(np.median(times))


def run(config_name: str, batch: int, length: int, steps: int, peak: float,
        **overrides) -> dict:
  config = dataclasses.replace(CONFIGS[config_name],
                               **{k: v for k, v in overrides.items() if v is not None})
  model = DecoderOnlyLM(config, OptimizerConfig(name='adamw', learning_rate=1e-4,
                                                schedule='constant', weight_decay=0.01))
  partitioner = Partitioner(mesh_shape=(-1, 1, 1))
  spec = {k: jax.ShapeDtypeStruct((batch, length), jnp.int32)
          for k in ('decoder_input_tokens', 'decoder_target_tokens', 'decoder_loss_weights')}
  fns = StepFunctions(model, partitioner, spec)
  rng = np.random.default_rng(0)
  targets = rng.integers(1, config.vocab_size, (batch, length), dtype=np.int32)
  host = {'decoder_target_tokens': targets,
          'decoder_input_tokens': np.pad(targets[:, :-1], ((0, 0), (1, 0))),
          'decoder_loss_weights': np.ones_like(targets)}
  with partitioner.context():
    state = fns.init(jax.random.PRNGKey(0))
    data = {k: jax.device_put(v, fns.batch_shardings[k]) for k, v in host.items()}
    t = time.perf_counter()
    compiled = fns.train_step.lower(state, data).compile()
    compile_s = time.perf_counter() - t
    flops = flops_of(compiled)
    for _ in range(2):
      state, metrics = compiled(state, data)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
      t = time.perf_counter()
      state, metrics = compiled(state, data)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - t)
  step_s = float(np.median(times))
  n_params = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
  analytic = analytic_flops(config, batch, length)
  row = {
      'config': config_name, 'remat': config.remat_policy, 'scan': config.scan_layers,
      'dtype': jnp.dtype(config.dtype).name, 'attention_block_size': config.attention_block_size,
      'device': f'{jax.device_count()} x {jax.devices()[0].device_kind}',
      'params_m': n_params / 1e6, 'batch': batch, 'length': length, 'step_ms': step_s * 1e3,
      'tokens_per_s': batch * length / step_s, 'compile_s': compile_s,
      'xla_tflop_per_step': flops / 1e12, 'analytic_tflop_per_step': analytic / 1e12,
      'loss': float(metrics['loss']),
  }
  row['achieved_tflops'] = analytic / step_s / 1e12
  row['mfu'] = analytic / step_s / peak if peak else float('nan')
  return row


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', choices=sorted(CONFIGS), default='anchor')
  parser.add_argument('--batch', type=int, default=4)
  parser.add_argument('--length', type=int, default=1024)
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--peak_tflops', type=float, default=0.0,
                      help='the device peak for MFU (TFLOP/s); 0: --measure_peak or none')
  parser.add_argument('--measure_peak', action='store_true',
                      help='measure the matmul peak of the default device (float32 on CPU, '
                           'bfloat16 elsewhere) and use it for MFU')
  parser.add_argument('--remat', default=None,
                      help="remat policy override: 'none', 'full', 'dots_saveable', ...")
  parser.add_argument('--scan', default=None, choices=['true', 'false'],
                      help='scan over layers override')
  parser.add_argument('--dtype', default=None, choices=['float32', 'bfloat16'],
                      help='compute dtype override')
  parser.add_argument('--attention_block_size', type=int, default=None,
                      help='TransformerConfig.attention_block_size override (0: dense attention)')
  parser.add_argument('--json', default='')
  args = parser.parse_args()
  peak = args.peak_tflops * 1e12
  measured = None
  if args.measure_peak:
    dtype = jnp.float32 if jax.default_backend() == 'cpu' else jnp.bfloat16
    measured = measure_matmul_peak(dtype, n=1024 if jax.default_backend() == 'cpu' else 8192)
    peak = peak or measured
  row = run(args.config, args.batch, args.length, args.steps, peak, remat_policy=args.remat,
            scan_layers=None if args.scan is None else args.scan == 'true',
            dtype=None if args.dtype is None else jnp.dtype(args.dtype),
            attention_block_size=args.attention_block_size)
  if measured:
    row['measured_matmul_tflops'] = measured / 1e12
  print('| config | remat / scan / dtype | device | params | batch x length | step | tokens/s | '
        'XLA TFLOP/step | model TFLOP/step | model TFLOP/s | MFU | compile |')
  print('|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|')
  print(f"| {row['config']} | {row['remat']} / {row['scan']} / {row['dtype']} | {row['device']} | {row['params_m']:.1f}M | {row['batch']} x "
        f"{row['length']} | {row['step_ms']:.1f} ms | {row['tokens_per_s']:,.0f} | "
        f"{row['xla_tflop_per_step']:.3f} | {row['analytic_tflop_per_step']:.3f} | "
        f"{row['achieved_tflops']:.2f} | {row['mfu']:.1%} | {row['compile_s']:.0f} s |")
  if measured:
    print(f'measured matmul peak: {measured / 1e12:.2f} TFLOP/s')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(row, f, indent=1)


if __name__ == '__main__':
  main()

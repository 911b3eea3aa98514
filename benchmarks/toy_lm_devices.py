"""Toy LM training throughput on 1 vs N simulated CPU devices (a record, not a target).

  .venv/bin/python benchmarks/toy_lm_devices.py [--steps 200] [--devices 1 8]

Each configuration runs in its own process (the device count is fixed when JAX starts), trains
the toy LM from gin_configs/examples/toy_lm.gin in a temporary MODEL_DIR, and reports the
steady-state rate the trainer measured (compilation excluded). Prints one table.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(steps: int, mesh: str):
  sys.path.insert(0, REPO)
  import gin  # pylint: disable=g-import-not-at-top
  from musiclm_jax import main  # pylint: disable=g-import-not-at-top
  from musiclm_jax.train import trainer  # pylint: disable=g-import-not-at-top
  main.setup_compilation_cache()
  with tempfile.TemporaryDirectory() as d:
    main.parse_gin(['examples/toy_lm.gin'], [f"MODEL_DIR='{d}'", f'TRAIN_STEPS={steps}',
                                             f'MESH_SHAPE={mesh}', 'train.eval_every_steps=0',
                                             f'train.log_every_steps={steps // 2}',
                                             f'train.checkpoint_every_steps={steps}'])
    result = trainer.train(progress_bar=False)
    gin.clear_config()
  print('RESULT ' + json.dumps({'steps_per_second': result.steps_per_second,
                                'tokens_per_second': result.tokens_per_second,
                                'final_loss': result.losses[max(result.losses)]}))


def main_():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--steps', type=int, default=200)
  parser.add_argument('--devices', type=int, nargs='+', default=[1, 8])
  parser.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
  parser.add_argument('--mesh', default='(-1, 1, 1)', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    child(args.steps, args.mesh)
    return
  rows = []
  for n in args.devices:
    env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={n}',
               TF_CPP_MIN_LOG_LEVEL='3')
    out = subprocess.run([sys.executable, __file__, '--child', '--steps', str(args.steps)],
                         env=env, capture_output=True, text=True, check=True, cwd=REPO)
    line = [l for l in out.stdout.splitlines() if l.startswith('RESULT ')][-1]
    rows.append((n, json.loads(line[len('RESULT '):])))
  base = rows[0][1]['steps_per_second']
  print(f'toy LM (d64, 2 layers, batch 16 x 32 tokens), {args.steps} steps, data-parallel mesh')
  print(f'{"devices":>8} {"steps/s":>9} {"tokens/s":>10} {"vs first":>9} {"final loss":>11}')
  for n, r in rows:
    print(f'{n:>8} {r["steps_per_second"]:>9.1f} {r["tokens_per_second"]:>10.0f} '
          f'{r["steps_per_second"] / base:>8.2f}x {r["final_loss"]:>11.4f}')


if __name__ == '__main__':
  main_()

"""Ours against the PyTorch peers, side by side in one run on this machine: a Markdown table.

  bash benchmarks/peers/setup_peers.sh            # once: the peers' venv, apart from ours
  nice -n 19 .venv/bin/python benchmarks/peers.py [--only train sample codec] [--repeats 5]
      [--rounds 1] [--threads 2] [--json out.json]

Lines (each ratio is ours / peer, both measured in this run, at the same shapes):

  train   one training step of a stage-sized decoder, tokens/s (batch x length per second).
          Ours: `stage_training.run` (the trainer's own jitted step: forward, backward, AdamW,
          clipping, non-finite guard) on a DecoderOnlyLM with T5 relative bias, d256 / 4 layers
          / 8 heads of 32 / MLP 1024 / vocabulary 1024, float32. Peer: audiolm-pytorch's
          `SemanticTransformer` at the same width, depth, heads, vocabulary, batch and length,
          cross-entropy, gradient clipping and `torch.optim.AdamW`, eager
          (benchmarks/peers/audiolm_train.py). Both: median of --repeats steps after 2 warm-up
          steps.
  minimal the same step of ours against a minimal eager PyTorch decoder of our anchor's shape
          (benchmarks/peers/torch_decoder_train.py: pre-LayerNorm layers, bias-free
          projections, GELU MLP of 4 x width, `scaled_dot_product_attention`), twice: with a
          T5 relative position bias through `attn_mask` (like for like) and with
          `is_causal=True` and no position information (PyTorch's fused causal kernel: the
          fastest such a decoder gets).
  sample  KV-cache sampling at batch 1, top-k 50 at temperature 1, --sample-length tokens after
          a 16-token prompt, tokens/s. Ours: `sampling.measure` (`generate.decode`) on the same
          decoder as above. Peer: `SemanticTransformerWrapper.generate(use_kv_cache=True)`
          (benchmarks/peers/audiolm_sample.py). Median of --repeats calls after one warm-up.
  codec   --seconds of 24 kHz audio, batch 1, at 6 kbps: encode and decode, x real time (clip
          seconds / compute seconds). Ours: `codec_speed.measure`, SoundStream with --channels
          (37: 14.6M parameters, the nearest to EnCodec's 14.9M), or with --fourier DxL the
          Fourier encoder/decoder codec (368x8: 14.8M), 12 x 1024 RVQ at 50 Hz. Peer:
          EnCodec 24 kHz with random weights at 6 kbps (8 x 1024 RVQ at 75 Hz)
          (benchmarks/peers/encodec_codec.py). Median of --repeats calls after one warm-up.

Ours runs in this process (JAX, jitted, compilation excluded); each peer in the peers' venv
(--peers-python; default ~/.cache/musiclm_jax/peers-venv/bin/python) as a subprocess with
PyTorch held to --threads intra-op threads (default: the core count, which is what XLA:CPU
uses). With --rounds N the two sides alternate N times per line and each figure is the median
of the N rounds' medians. Compare rows of one run: the machine may be shared.
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

import jax  # noqa: E402  pylint: disable=g-import-not-at-top

import codec_speed  # noqa: E402  pylint: disable=g-import-not-at-top  (benchmarks/, beside this file)
import sampling  # noqa: E402  pylint: disable=g-import-not-at-top
import stage_training  # noqa: E402  pylint: disable=g-import-not-at-top

DEFAULT_PEERS_PYTHON = os.path.join(
    os.environ.get('PEERS_VENV', os.path.expanduser('~/.cache/musiclm_jax/peers-venv')),
    'bin', 'python')
LINES = ('train', 'minimal', 'sample', 'codec')


def stage_config(args):
  """Our anchor decoder at the command line's width, depth and heads (MLP 4 x width)."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  return dataclasses.replace(
      stage_training.CONFIGS['anchor'], vocab_size=args.vocab, embed_dim=args.dim,
      num_layers=args.depth, num_heads=args.heads, head_dim=args.dim // args.heads,
      mlp_dim=4 * args.dim)


def run_peer(args, script: str, *flags) -> dict:
  """Runs benchmarks/peers/`script` in the peers' venv; its last stdout line is JSON."""
  command = [args.peers_python, os.path.join(HERE, 'peers', script),
             '--threads', str(args.threads), *map(str, flags)]
  env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
  proc = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
  if proc.returncode != 0:
    raise RuntimeError(f'{" ".join(command)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}')
  return json.loads(proc.stdout.strip().splitlines()[-1])


def ours_train(args) -> dict:
  config = stage_config(args)
  row = stage_training.run('anchor', args.batch, args.length, args.repeats, 0.0,
                           **{f: getattr(config, f) for f in (
                               'vocab_size', 'embed_dim', 'num_layers', 'num_heads',
                               'head_dim', 'mlp_dim')})
  return {'value': row['tokens_per_s'], 'params': row['params_m'] * 1e6}


def peer_train(args) -> dict:
  row = run_peer(args, 'audiolm_train.py', '--dim', args.dim, '--depth', args.depth,
                 '--heads', args.heads, '--vocab', args.vocab, '--batch', args.batch,
                 '--length', args.length, '--repeats', args.repeats)
  return {'value': row['tokens_per_s'], 'params': row['params'], 'versions': row['versions']}


def peer_minimal(args, relative_bias: bool) -> dict:
  flags = ['--relative-bias'] if relative_bias else []
  row = run_peer(args, 'torch_decoder_train.py', '--dim', args.dim, '--depth', args.depth,
                 '--heads', args.heads, '--mlp', 4 * args.dim, '--vocab', args.vocab,
                 '--batch', args.batch, '--length', args.length, '--repeats', args.repeats,
                 *flags)
  return {'value': row['tokens_per_s'], 'params': row['params'], 'versions': row['versions']}


def ours_sample(args) -> dict:
  row = sampling.measure(stage_config(args), args.sample_length, args.repeats,
                         temperature=1.0, top_k=50)
  return {'value': row['tokens_per_s'], 'params': row['params']}


def peer_sample(args) -> dict:
  row = run_peer(args, 'audiolm_sample.py', '--dim', args.dim, '--depth', args.depth,
                 '--heads', args.heads, '--vocab', args.vocab,
                 '--prompt', sampling.PROMPT_LENGTH, '--length', args.sample_length,
                 '--top-k', 50, '--repeats', args.repeats)
  return {'value': row['tokens_per_s'], 'params': row['params'], 'versions': row['versions']}


def ours_codec(args) -> dict:
  model = None
  if args.fourier:
    dim, layers = (int(x) for x in args.fourier.split('x'))
    model = codec_speed.fourier_codec(dim, layers)
  row = codec_speed.measure(args.channels, args.seconds, args.repeats, model=model)
  return {'encode': args.seconds / row['encode_s'], 'decode': args.seconds / row['decode_s'],
          'params': row['params']}


def peer_codec(args) -> dict:
  row = run_peer(args, 'encodec_codec.py', '--seconds', args.seconds, '--bandwidth', 6.0,
                 '--repeats', args.repeats)
  return {'encode': row['encode_x_realtime'], 'decode': row['decode_x_realtime'],
          'params': row['params'], 'versions': row['versions']}


def alternate(args, ours, peer, keys=('value',)) -> tuple[dict, dict]:
  """--rounds of ours then peer; each key's median over the rounds."""
  results = {'ours': [], 'peer': []}
  for r in range(args.rounds):
    for side, fn in (('ours', ours), ('peer', peer)):
      start = time.perf_counter()
      results[side].append(fn(args))
      print(f'  round {r + 1}/{args.rounds} {side}: '
            f'{ {k: round(results[side][-1][k], 1) for k in keys} } '
            f'({time.perf_counter() - start:.0f} s)', file=sys.stderr, flush=True)
  merged = {}
  for side, rows in results.items():
    merged[side] = dict(rows[-1])
    for k in keys:
      merged[side][k] = statistics.median(row[k] for row in rows)
      merged[side][k + '_rounds'] = [row[k] for row in rows]
  return merged['ours'], merged['peer']


def cpu_name() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--only', nargs='+', choices=LINES, default=list(LINES))
  parser.add_argument('--dim', type=int, default=256)
  parser.add_argument('--depth', type=int, default=4)
  parser.add_argument('--heads', type=int, default=8)
  parser.add_argument('--vocab', type=int, default=1024)
  parser.add_argument('--batch', type=int, default=4, help='training batch')
  parser.add_argument('--length', type=int, default=1024, help='training length')
  parser.add_argument('--sample-length', type=int, default=500, help='tokens to sample')
  parser.add_argument('--seconds', type=float, default=10.0, help='codec clip length')
  parser.add_argument('--channels', type=int, default=37,
                      help="our SoundStream's base channels (37: 14.6M parameters)")
  parser.add_argument('--fourier', default='', metavar='DxL',
                      help='time our Fourier encoder/decoder codec of width D, L blocks instead '
                           '(368x8: 14.8M parameters; 192x6: models/codec/tiny.gin)')
  parser.add_argument('--repeats', type=int, default=5,
                      help='timed steps / calls per side per round (median)')
  parser.add_argument('--rounds', type=int, default=1, help='ours/peer alternations per line')
  parser.add_argument('--threads', type=int, default=os.cpu_count(),
                      help="PyTorch's intra-op threads (XLA:CPU uses one per core)")
  parser.add_argument('--peers-python', default=DEFAULT_PEERS_PYTHON)
  parser.add_argument('--json', default='')
  args = parser.parse_args()
  if not os.path.exists(args.peers_python):
    sys.exit(f'{args.peers_python} not found: run bash benchmarks/peers/setup_peers.sh first')

  load_before = os.getloadavg()
  started = datetime.datetime.now(datetime.timezone.utc)
  rows, versions, notes = [], {}, []
  if 'train' in args.only:
    print('train ...', file=sys.stderr, flush=True)
    ours, peer = alternate(args, ours_train, peer_train)
    versions.update(peer['versions'])
    rows.append(('stage training step, tokens/s', f'{args.batch} x {args.length}, AdamW',
                 ours['value'], peer['value'], 'audiolm-pytorch SemanticTransformer'))
    notes.append(f'train: ours {ours["params"] / 1e6:.2f}M parameters, '
                 f'audiolm-pytorch {peer["params"] / 1e6:.2f}M')
  if 'minimal' in args.only:
    for relative_bias, name in ((True, 'minimal PyTorch decoder, T5 relative bias'),
                                (False, 'minimal PyTorch decoder, is_causal, no position bias')):
      print(f'minimal (relative bias: {relative_bias}) ...', file=sys.stderr, flush=True)
      ours, peer = alternate(args, ours_train,
                             lambda a, rb=relative_bias: peer_minimal(a, rb))
      versions.update(peer['versions'])
      rows.append(('stage training step, tokens/s', f'{args.batch} x {args.length}, AdamW',
                   ours['value'], peer['value'], name))
      notes.append(f'minimal: ours {ours["params"] / 1e6:.2f}M parameters, {name} '
                   f'{peer["params"] / 1e6:.2f}M')
  if 'sample' in args.only:
    print('sample ...', file=sys.stderr, flush=True)
    ours, peer = alternate(args, ours_sample, peer_sample)
    versions.update(peer['versions'])
    rows.append(('KV-cache sampling, tokens/s', f'batch 1, {args.sample_length} tokens, top-k 50',
                 ours['value'], peer['value'], 'audiolm-pytorch generate(use_kv_cache)'))
    notes.append(f'sample: ours {ours["params"] / 1e6:.2f}M parameters, '
                 f'audiolm-pytorch {peer["params"] / 1e6:.2f}M')
  if 'codec' in args.only:
    print('codec ...', file=sys.stderr, flush=True)
    ours, peer = alternate(args, ours_codec, peer_codec, keys=('encode', 'decode'))
    versions.update(peer['versions'])
    shape = f'{args.seconds:g} s at 24 kHz, 6 kbps'
    rows.append(('codec encode, x real time', shape, ours['encode'], peer['encode'],
                 'EnCodec 24 kHz'))
    rows.append(('codec decode, x real time', shape, ours['decode'], peer['decode'],
                 'EnCodec 24 kHz'))
    ours_name = (f'Fourier codec {args.fourier}' if args.fourier else
                 f'SoundStream(channels={args.channels})')
    notes.append(f'codec: ours {ours_name} '
                 f'{ours["params"] / 1e6:.2f}M parameters, EnCodec {peer["params"] / 1e6:.2f}M '
                 f'({ours["params"] / peer["params"] - 1:+.1%})')
  load_after = os.getloadavg()

  import flax  # pylint: disable=g-import-not-at-top
  versions = {'jax': jax.__version__, 'flax': flax.__version__, **versions}
  print(f'\n{started:%Y-%m-%d %H:%M} UTC; {cpu_name()}, {os.cpu_count()} cores, '
        f'{jax.device_count()} x {jax.devices()[0].device_kind}; PyTorch threads {args.threads}; '
        f'repeats {args.repeats}, rounds {args.rounds}; load average '
        f'{load_before[0]:.1f} before, {load_after[0]:.1f} after')
  print('versions: ' + ', '.join(f'{k} {v}' for k, v in versions.items()))
  print()
  print('| line | shape | ours | peer | ratio (ours/peer) | peer |')
  print('|---|---|---:|---:|---:|---|')
  for line, shape, ours_v, peer_v, peer_name in rows:
    fmt = '{:,.0f}' if 'tokens' in line else '{:.1f}x'
    print(f'| {line} | {shape} | {fmt.format(ours_v)} | {fmt.format(peer_v)} | '
          f'{ours_v / peer_v:.2f} | {peer_name} |')
  print()
  for note in notes:
    print(note)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'started': started.isoformat(), 'cpu': cpu_name(), 'cores': os.cpu_count(),
                 'load_before': load_before, 'load_after': load_after, 'versions': versions,
                 'args': vars(args), 'notes': notes,
                 'rows': [dict(zip(('line', 'shape', 'ours', 'peer', 'peer_name'), r))
                          for r in rows]}, f, indent=1)


if __name__ == '__main__':
  main()

"""How fast an encoder/decoder pair learns on the corpus, with the RVQ or without it.

  .venv/bin/python benchmarks/codec_learning_probe.py --encoder fourier --decoder fourier \
      [--steps 600] [--no_rvq] [--train_clips 200]

A bare training loop (no trainer, no adversary) on random 0.5 s crops (batch 8) of the first
--train_clips clips of the embedded corpus's train split, with the tiny recipe's reconstruction
loss (SoundStream's multi-scale mel loss + 0.1 waveform L1 + the commitment loss) and optimizer
(Adam 2e-3, b1 0.8, b2 0.9, clipping at 1). Every 200 steps it scores 8 validation clips of 5 s:
the multi-scale mel distance of the encoder-decoder pair without quantization, and of the same
decoder given each clip's latent averaged over time (when the two are close, the decoder is not
following its latent). With --no_rvq the quantizer is left out of training too: what the pair
learns as a plain autoencoder. Widths are the tiny codec's (SEANet 8 channels, Fourier 192 x 6
blocks), the latent 64-dimensional unless --embedding_dim says otherwise.

This is how README's codec section found that the SEANet *encoder* is what keeps the tiny codec
from learning on 2 CPU cores: with the Fourier decoder and no quantizer at all, the SEANet
encoder reaches 0.506 at 600 steps, the Fourier encoder 0.398 (and twice as fast per step).
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
import optax  # noqa: E402  pylint: disable=g-import-not-at-top

from musiclm_jax.codec import losses  # noqa: E402  pylint: disable=g-import-not-at-top
from musiclm_jax.codec.soundstream import SoundStream  # noqa: E402  pylint: disable=g-import-not-at-top
from musiclm_jax.evaluation.codec_report import corpus_clips  # noqa: E402  pylint: disable=g-import-not-at-top
from musiclm_jax.nn.quantizer import STATE_COLLECTION  # noqa: E402  pylint: disable=g-import-not-at-top

CROP = 12000
BATCH = 8


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--encoder', choices=('seanet', 'fourier'), default='fourier')
  parser.add_argument('--decoder', choices=('seanet', 'fourier'), default='fourier')
  parser.add_argument('--steps', type=int, default=600)
  parser.add_argument('--no_rvq', action='store_true', help='train a plain autoencoder')
  parser.add_argument('--embedding_dim', type=int, default=64)
  parser.add_argument('--train_clips', type=int, default=200)
  parser.add_argument('--tfds_data_dir', default=None)
  args = parser.parse_args()

  pool = corpus_clips('train', args.tfds_data_dir, 10.0, args.train_clips, 24000)
  val = corpus_clips('validation', args.tfds_data_dir, 5.0, 8, 24000)
  rng = np.random.default_rng(0)

  def batch():
    rows = rng.integers(0, len(pool), BATCH)
    starts = rng.integers(0, pool.shape[1] - CROP, BATCH)
    return np.stack([pool[r, s:s + CROP] for r, s in zip(rows, starts)])

  model = SoundStream(channels=8, channel_mults=(2, 4, 8, 16), embedding_dim=args.embedding_dim,
                      num_levels=12, codebook_size=1024, dead_code_threshold=0.05,
                      encoder_type=args.encoder, decoder_type=args.decoder, fourier_dim=192,
                      fourier_layers=6)
  variables = model.init({'params': jax.random.key(0)}, val[:, :960], train=False)
  params, state = variables['params'], variables[STATE_COLLECTION]
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(2e-3, b1=0.8, b2=0.9))
  opt_state = tx.init(params)

  def encode(v, audio):
    return model.apply(v, audio, method=lambda m, a: m.encoder(m._pad_to_hops(a)))  # pylint: disable=protected-access

  def decode(v, z):
    return model.apply(v, z, method=lambda m, x: m.decoder(x))

  def loss_fn(p, s, key, audio):
    if args.no_rvq:
      v = {'params': p, STATE_COLLECTION: s}
      recon, commitment = decode(v, encode(v, audio))[:, :audio.shape[1]], 0.0
    else:
      out, mutated = model.apply({'params': p, STATE_COLLECTION: s}, audio, train=True,
                                 rngs={'quantizer': key}, mutable=[STATE_COLLECTION])
      recon, commitment, s = out['audio'], out['commitment_loss'], mutated[STATE_COLLECTION]
    loss = (losses.multi_scale_mel_loss(audio, recon) +
            0.1 * jnp.mean(jnp.abs(audio - recon)) + commitment)
    return loss, s

  @jax.jit
  def step(p, s, o, key, audio):
    (loss, s), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, s, key, audio)
    updates, o = tx.update(grads, o, p)
    return optax.apply_updates(p, updates), s, o, loss

  @jax.jit
  def evaluate(p, s):
    v = {'params': p, STATE_COLLECTION: s}
    z = encode(v, val)
    recon = decode(v, z)[:, :val.shape[1]]
    held = decode(v, jnp.broadcast_to(z.mean(1, keepdims=True), z.shape))[:, :val.shape[1]]
    return (jnp.mean(losses.multi_scale_mel_distance(val, recon)),
            jnp.mean(losses.multi_scale_mel_distance(val, held)))

  print(f'encoder {args.encoder}, decoder {args.decoder}, latent {args.embedding_dim}, '
        f'{"no RVQ" if args.no_rvq else "12 x 1024 RVQ with quantizer dropout"}')
  print(f'{"step":>6} {"seconds":>8} {"mel distance":>13} {"time-mean latent":>17}')
  start = time.time()
  for i in range(args.steps + 1):
    if i % 200 == 0 or i == args.steps:
      distance, held = evaluate(params, state)
      print(f'{i:>6} {time.time() - start:>8.0f} {float(distance):>13.3f} {float(held):>17.3f}',
            flush=True)
    if i < args.steps:
      params, state, opt_state, _ = step(params, state, opt_state, jax.random.key(i), batch())


if __name__ == '__main__':
  main()

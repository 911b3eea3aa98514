"""The SoundStream codec as a trainable model: generator and discriminators as two groups (GAN)."""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np

from musiclm_jax.audio import features
from musiclm_jax.codec import losses as losses_lib
from musiclm_jax.codec.discriminators import CodecDiscriminators
from musiclm_jax.codec.soundstream import SoundStream
from musiclm_jax.nn.quantizer import STATE_COLLECTION
from musiclm_jax.train.models import BaseModel
from musiclm_jax.train.optimizers import OptimizerConfig

GENERATOR = 'generator'
DISCRIMINATOR = 'discriminator'


def _logits(outputs):
  return [logits for logits, _ in outputs]


def _features(outputs):
  return [feats for _, feats in outputs]


@gin.configurable
class CodecModel(BaseModel):
  """SoundStream trained as a GAN in the common trainer.

  Batches are {'audio': [batch, samples] float32} (DatasetConfig.feature_converter = 'audio').
  The generator group (encoder, RVQ, decoder) minimises

    mel_weight * multi-scale mel loss + waveform_l1_weight * |x - y|_1 + commitment loss
      + ramp * (adversarial_weight * hinge generator loss
                + feature_matching_weight * feature-matching loss)

  and the discriminator group the hinge loss (times `ramp` too). `ramp` is 0 before
  `adversarial_start_step` (the adversary warm-up: the codec first learns to reconstruct, so the
  discriminators do not overpower a generator that outputs noise), then rises linearly to 1 over
  `adversarial_ramp_steps`. The discriminators update on every `discriminator_update_every`-th
  step only (update balance). The losses are decoupled with stop_gradient (the generator sees the
  discriminators' parameters as constants, the discriminators see the reconstruction as a
  constant), so the trainer runs one forward and one backward pass per step.

  The RVQ codebooks (EMA, k-means initialised) and, with `ema_decay`, an exponential moving
  average of the generator's parameters live in `model_state`; evaluation and `encode`/`decode`
  use the EMA weights when present.
  """

  losses_are_decoupled = True
  has_eval_summaries = True

  def __init__(self,
               generator: SoundStream = gin.REQUIRED,
               discriminators: Optional[CodecDiscriminators] = None,
               generator_optimizer: OptimizerConfig = OptimizerConfig(),
               discriminator_optimizer: OptimizerConfig = OptimizerConfig(),
               mel_weight: float = 1.0,
               waveform_l1_weight: float = 0.0,
               adversarial_weight: float = 1.0,
               feature_matching_weight: float = 1.0,
               adversarial_start_step: int = 1000,
               adversarial_ramp_steps: int = 1000,
               discriminator_update_every: int = 1,
               ema_decay: Optional[float] = None,
               eval_levels: Sequence[int] = (3, 6, 12),
               num_summary_examples: int = 2):
    """See the class docstring; `eval_levels` are the RVQ levels evaluated (12 = 6 kbps)."""
    self.generator = generator
    self.discriminators = discriminators
    self.generator_optimizer = generator_optimizer
    self.discriminator_optimizer = discriminator_optimizer
    self.mel_weight = mel_weight
    self.waveform_l1_weight = waveform_l1_weight
    self.adversarial_weight = adversarial_weight
    self.feature_matching_weight = feature_matching_weight
    self.adversarial_start_step = int(adversarial_start_step)
    self.adversarial_ramp_steps = int(adversarial_ramp_steps)
    self.discriminator_update_every = max(1, int(discriminator_update_every))
    self.ema_decay = ema_decay
    levels = generator.num_levels
    bad = [n for n in eval_levels if not 1 <= n <= levels]
    if bad:
      raise ValueError(f'CodecModel.eval_levels={tuple(eval_levels)}: levels {bad} are outside '
                       f'1..{levels} (the generator has {levels} RVQ levels)')
    self.eval_levels = tuple(eval_levels)
    self.num_summary_examples = num_summary_examples

  @property
  def optimizers(self) -> Mapping[str, OptimizerConfig]:
    groups = {GENERATOR: self.generator_optimizer}
    if self.discriminators is not None:
      groups[DISCRIMINATOR] = self.discriminator_optimizer
    return groups

  @property
  def sample_rate(self) -> int:
    return self.generator.sample_rate

  @property
  def summary_sample_rate(self) -> int:
    return self.generator.sample_rate

  # ------------------------------------------------------------------ variables
  def init_variables(self, rng, batch):
    audio = jnp.zeros((1,) + tuple(batch['audio'].shape[1:]), jnp.float32)
    g_rng, q_rng, d_rng = jax.random.split(rng, 3)
    g_vars = self.generator.init({'params': g_rng, 'quantizer': q_rng}, audio, train=False)
    params = {GENERATOR: g_vars['params']}
    model_state = {STATE_COLLECTION: g_vars[STATE_COLLECTION],
                   'step': jnp.zeros((), jnp.int32)}
    if self.ema_decay:
      model_state['ema_generator'] = g_vars['params']
    if self.discriminators is not None:
      params[DISCRIMINATOR] = self.discriminators.init(d_rng, audio)['params']
    return {'params': params, 'model_state': model_state}

  def generator_variables(self, params, model_state, use_ema: bool = True):
    """The generator's variables for inference: EMA weights when kept, and the codebooks."""
    g_params = params[GENERATOR]
    if use_ema and 'ema_generator' in model_state:
      g_params = model_state['ema_generator']
    return {'params': g_params, STATE_COLLECTION: model_state[STATE_COLLECTION]}

  # ------------------------------------------------------------------ training
  def _ramp(self, step):
    if self.adversarial_ramp_steps <= 0:
      return (step >= self.adversarial_start_step).astype(jnp.float32)
    return jnp.clip((step - self.adversarial_start_step + 1) / self.adversarial_ramp_steps,
                    0.0, 1.0).astype(jnp.float32)

  def compute_losses(self, params, model_state, batch, rng):
    audio = batch['audio'].astype(jnp.float32)
    step = model_state['step']
    out, new_q = self.generator.apply(
        {'params': params[GENERATOR], STATE_COLLECTION: model_state[STATE_COLLECTION]},
        audio, train=True, rngs={'quantizer': rng}, mutable=[STATE_COLLECTION])
    recon = out['audio'].astype(jnp.float32)
    mel = losses_lib.multi_scale_mel_loss(audio, recon, sample_rate=self.sample_rate)
    l1 = jnp.mean(jnp.abs(audio - recon))
    g_loss = self.mel_weight * mel + self.waveform_l1_weight * l1 + out['commitment_loss']
    metrics = {'loss': g_loss, 'mel_loss': mel, 'waveform_l1': l1,
               'commitment_loss': out['commitment_loss'],
               'code_usage': jnp.mean(out['usage']), 'code_perplexity': jnp.mean(out['perplexity']),
               'code_usage/level_1': out['usage'][0],
               'code_usage/last_level': out['usage'][-1]}
    losses = {GENERATOR: g_loss}
    if self.discriminators is not None:
      ramp = self._ramp(step)
      update_d = (step % self.discriminator_update_every == 0).astype(jnp.float32)

      def adversarial(d_params, recon):
        # Generator side: the discriminators' parameters are constants.
        fake_for_g = self.discriminators.apply({'params': jax.lax.stop_gradient(d_params)},
                                               recon)
        # Discriminator side: the reconstruction is a constant.
        fake_for_d = self.discriminators.apply({'params': d_params},
                                               jax.lax.stop_gradient(recon))
        real = self.discriminators.apply({'params': d_params}, audio)
        g_adv = losses_lib.hinge_generator_loss(_logits(fake_for_g))
        # Real features are targets (feature_matching_loss stops their gradient), so this term
        # reaches the generator only, through fake_for_g.
        fm = losses_lib.feature_matching_loss(_features(real), _features(fake_for_g))
        d_loss = losses_lib.hinge_discriminator_loss(_logits(real), _logits(fake_for_d))
        real_acc = jnp.mean(jnp.stack([jnp.mean((l > 0).astype(jnp.float32))
                                       for l in _logits(real)]))
        fake_acc = jnp.mean(jnp.stack([jnp.mean((l < 0).astype(jnp.float32))
                                       for l in _logits(fake_for_d)]))
        return g_adv, fm, d_loss, real_acc, fake_acc

      def warm_up(d_params, recon):
        # Before the adversary joins, skip the discriminators' passes altogether (lax.cond
        # runs one branch); the zeros keep every parameter in the gradient tree.
        zero = 0.0 * (jnp.sum(recon) + sum(jnp.sum(x) for x in jax.tree_util.tree_leaves(
            d_params)))
        return zero, zero, zero, zero, zero

      g_adv, fm, d_loss, real_acc, fake_acc = jax.lax.cond(
          ramp > 0, adversarial, warm_up, params[DISCRIMINATOR], recon)
      losses[GENERATOR] = g_loss + ramp * (self.adversarial_weight * g_adv +
                                           self.feature_matching_weight * fm)
      losses[DISCRIMINATOR] = ramp * update_d * d_loss
      metrics.update({'adversarial_ramp': ramp, 'generator_adversarial': g_adv,
                      'feature_matching': fm, 'discriminator_hinge': d_loss,
                      'discriminator_real_accuracy': real_acc,
                      'discriminator_fake_accuracy': fake_acc})
    new_state = dict(model_state)
    new_state[STATE_COLLECTION] = new_q[STATE_COLLECTION]
    new_state['step'] = step + 1
    if 'ema_generator' in model_state:
      decay = self.ema_decay
      new_state['ema_generator'] = jax.tree_util.tree_map(
          lambda e, p: decay * e + (1.0 - decay) * jax.lax.stop_gradient(p),
          model_state['ema_generator'], params[GENERATOR])
    return losses, metrics, new_state

  # ------------------------------------------------------------------ evaluation
  def reconstruct(self, params, model_state, audio, n_levels: Optional[int] = None):
    """Deterministic encode -> quantize -> decode with `n_levels` RVQ levels (None: all)."""
    out = self.generator.apply(self.generator_variables(params, model_state),
                               audio.astype(jnp.float32), train=False, n_levels=n_levels)
    return out

  def bitrate_kbps(self, n_levels: int) -> float:
    return self.generator.bitrate(n_levels) / 1000.0

  def eval_metrics(self, params, model_state, batch):
    audio = batch['audio'].astype(jnp.float32)
    # Rows of zeros pad a final partial batch: they carry no weight.
    weight = jnp.any(audio != 0, axis=-1).astype(jnp.float32)
    total = jnp.sum(weight)
    metrics = {}
    for n in self.eval_levels:
      out = self.reconstruct(params, model_state, audio, n)
      tag = f'{self.bitrate_kbps(n):g}kbps'
      dist = losses_lib.multi_scale_mel_distance(audio, out['audio'], sample_rate=self.sample_rate)
      snr = losses_lib.si_snr(audio, out['audio'])
      metrics[f'mel_distance/{tag}'] = (jnp.sum(dist * weight), total)
      metrics[f'si_snr/{tag}'] = (jnp.sum(snr * weight), total)
      if n == max(self.eval_levels):
        usage, perplexity = losses_lib.code_statistics(out['codes'][..., :n],
                                                       self.generator.codebook_size)
        metrics['code_usage'] = (jnp.mean(usage), jnp.ones(()))
        metrics['code_perplexity'] = (jnp.mean(perplexity), jnp.ones(()))
    return metrics

  def eval_summaries(self, params, model_state, batch):
    k = self.num_summary_examples
    audio = batch['audio'][:k].astype(jnp.float32)
    n = max(self.eval_levels)
    recon = self.reconstruct(params, model_state, audio, n)['audio']
    front_end = features.LogMelFrontEnd(sample_rate=self.sample_rate, n_mels=80)

    def picture(x):
      mel = front_end(x)  # [k, frames, mels]
      lo = jnp.max(mel, axis=(1, 2), keepdims=True) - 8.0  # an 8-nat (~35 dB) window
      return jnp.clip((mel - lo) / 8.0, 0.0, 1.0)

    # Original above reconstruction, low frequencies at the bottom, time left to right.
    both = jnp.concatenate([picture(audio)[..., ::-1], picture(recon)[..., ::-1]], axis=-1)
    image = jnp.transpose(both, (0, 2, 1))[..., None]
    return {'audio/original': audio, f'audio/reconstruction_{self.bitrate_kbps(n):g}kbps': recon,
            'image/log_mel_original_over_reconstruction': jnp.repeat(image, 3, axis=-1)}

  def num_tokens(self, batch):
    """Codec frames in the batch (throughput is reported in frames per second)."""
    audio = np.asarray(batch['audio'])
    return int(audio.shape[0] * (audio.shape[1] // self.generator.hop_length))


def encode(model: CodecModel, params, model_state, audio, n_levels: Optional[int] = None):
  """Codes [batch, frames, levels] of audio [batch, samples] with a trained CodecModel's state."""
  return model.generator.apply(model.generator_variables(params, model_state), audio,
                               n_levels=n_levels, method=SoundStream.encode)


def decode(model: CodecModel, params, model_state, codes):
  """Audio [batch, frames * hop] of codes [batch, frames, n <= levels]."""
  return model.generator.apply(model.generator_variables(params, model_state), codes,
                               method=SoundStream.decode)


def load_codec(model_dir: str, step: Optional[int] = None, partitioner=None):
  """A trained codec from its run directory: (model, params, model_state, step).

  The model is rebuilt from MODEL_DIR/config.gin (the operative config the run wrote), the
  state restored from MODEL_DIR/checkpoints (`step`, default the latest readable).
  """
  from musiclm_jax.train.loading import load_run  # pylint: disable=g-import-not-at-top
  return load_run(
      model_dir, CodecModel,
      lambda model: {'audio': jax.ShapeDtypeStruct((jax.device_count(),
                                                    model.generator.hop_length), jnp.float32)},
      step, partitioner, what='codec run')

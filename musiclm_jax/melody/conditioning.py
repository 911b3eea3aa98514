"""Melody conditioning tokens: an RVQ over melody embeddings, and the MuLan + melody prefix.

MusicLM quantizes the melody embeddings (192-d, one per 4 s window, three per 10 s clip) with a
residual VQ of 24 levels x 512 codes and concatenates the resulting melody tokens with the MuLan
tokens as the conditioning prefix of its stages. The RVQ here is the MuLan conditioner's
(`musiclm_jax.mulan.conditioning.fit_rvq` / `rvq_encode` / `rvq_decode`: one k-means per level
on the residuals of the levels before, deterministic per seed, greedy encoding); it is fitted on
the window embeddings of a corpus sample.

The conditioning prefix (`ConditioningLayout`). One int32 sequence per clip:

  [ MuLan level 0 .. level Lm-1 | window 0: melody level 0 .. Ld-1 | window 1: ... | window W-1 ]

every MuLan token first, then the melody tokens frame-major (all levels of a window, then the
next window), as the design's token layout flattens RVQ streams. Every RVQ level of each stream
has its own vocabulary range, so a token id says which stream and level it came from:

  MuLan level l, code c           -> offset + l * Km + c
  melody level l, code c (any w)  -> offset + Lm * Km + l * Kd + c

with Km, Kd the codebook sizes; the prefix uses `vocab_size = Lm * Km + Ld * Kd` ids from
`offset` (the stage places it after its other streams). The paper sizes (12 x 1024 MuLan, 24 x
512 melody, 3 windows per 10 s) give 12 + 72 = 84 tokens over 24,576 ids.

A melody conditioner directory (written by `save_melody_conditioner`, atomically, never over an
existing one without `overwrite`):

  variables/               orbax PyTree {'params': {'encoder': <the MelodyEncoder's params>,
                                                    'codebooks': float32 [levels, codes, 192]}}
  melody_conditioner.json  the encoder's configuration (rebuilt by `module_from_config`), levels,
                           codes, window and hop, sample rate, provenance, the fit's statistics

Typical use:

  fit_melody_conditioner('runs/melody_tiny', 'runs/melody_conditioner_tiny',
                         num_levels=24, codebook_size=64)
  cond = load_melody_conditioner('runs/melody_conditioner_tiny')
  cond.tokens(wav_10s)                     # int32 [B, 3, 24]
  layout = ConditioningLayout(12, 1024, 24, 64, melody_windows=3)
  prefix = layout.prefix(mulan_tokens, cond.tokens(wav_10s))   # int32 [B, 84]
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Optional

import flax.linen as nn
import gin
import jax
import numpy as np

from musiclm_jax.melody.encoder import MelodyEncoder
from musiclm_jax.data.integrity import check_params
from musiclm_jax.data.module_records import module_config, module_from_config
from musiclm_jax.mulan.conditioning import fit_rvq, rvq_decode, rvq_encode

logger = logging.getLogger(__name__)

SAMPLE_RATE = 24000
_FORMAT = 'musiclm_jax.melody_conditioner/1'
_RECORD = 'melody_conditioner.json'

__all__ = ['ConditioningLayout', 'MelodyConditioner', 'fit_melody_conditioner', 'fit_rvq',
           'load_melody_conditioner', 'load_melody_run', 'rvq_decode', 'rvq_encode',
           'save_melody_conditioner']


# ---------------------------------------------------------------------------
# The conditioner
# ---------------------------------------------------------------------------


def segment_samples(window_samples: int, hop_samples: int, frames: int) -> int:
  """Samples of audio `frames` melody tokens describe: window + (frames - 1) * hop."""
  return window_samples + (frames - 1) * hop_samples


def looped_segment(audio: Any, start: int, length: int) -> Any:
  """audio[..., start:start + length], looped past the end (how a tune shorter than the span
  it conditions is followed): the one layout of melody tokens in training (the stage-token
  cache, from sample 0), sampling (each window's start) and evaluation."""
  return audio[..., (int(start) + np.arange(length)) % audio.shape[-1]]


class MelodyConditioner:
  """A melody encoder and the RVQ over its space: audio -> int32 melody tokens per window.

  Attributes:
    network: the `MelodyEncoder` (its window and hop set the windows).
    params: its parameters.
    codebooks: float32 [levels, codes, output_dim].
  """

  def __init__(self, network: MelodyEncoder, params: Any, codebooks: np.ndarray):
    self.network = network
    self.params = jax.device_put(nn.meta.unbox(params))
    self.codebooks = np.asarray(codebooks, np.float32)
    if self.codebooks.ndim != 3 or self.codebooks.shape[-1] != network.output_dim:
      raise ValueError(f'codebooks must be [levels, codes, {network.output_dim}], got shape '
                       f'{self.codebooks.shape}')
    self._embed = jax.jit(lambda p, a: network.apply({'params': p}, a,
                                                     method=MelodyEncoder.embed_windows))

  @property
  def num_levels(self) -> int:
    return int(self.codebooks.shape[0])

  @property
  def codebook_size(self) -> int:
    return int(self.codebooks.shape[1])

  def num_windows(self, num_samples: int) -> int:
    """Windows (token frames) of a clip of `num_samples` samples: 3 for 10 s."""
    return self.network.num_windows(num_samples)

  def embed(self, wav: Any) -> np.ndarray:
    """24 kHz audio [samples] or [batch, samples] -> float32 [(batch,) windows, 192]."""
    wav = np.asarray(wav, np.float32)
    single = wav.ndim == 1
    wav = wav[None] if single else wav
    if wav.ndim != 2:
      raise ValueError(f'wav must be [samples] or [batch, samples], got shape {wav.shape}')
    emb = np.asarray(self._embed(self.params, wav))
    return emb[0] if single else emb

  def quantize(self, emb: Any) -> np.ndarray:
    """Embeddings [..., 192] -> int32 tokens [..., levels]."""
    return np.asarray(rvq_encode(emb, self.codebooks))

  def dequantize(self, tokens: Any) -> np.ndarray:
    """int tokens [..., levels] -> float32 [..., 192] (the sum of the chosen codewords)."""
    return np.asarray(rvq_decode(tokens, self.codebooks))

  def tokens(self, wav: Any) -> np.ndarray:
    """Melody tokens of audio: int32 [windows, levels] or [batch, windows, levels]."""
    return self.quantize(self.embed(wav))


def save_melody_conditioner(conditioner_dir: str, conditioner: MelodyConditioner,
                            info: Optional[dict[str, Any]] = None,
                            overwrite: bool = False) -> str:
  """Writes a melody conditioner directory atomically (module docstring); returns its path."""
  from musiclm_jax.data.frozen_tokenizer import fingerprint  # pylint: disable=g-import-not-at-top
  from musiclm_jax.data.model_dir import save_model_dir  # pylint: disable=g-import-not-at-top
  params = {'encoder': jax.tree_util.tree_map(np.asarray, conditioner.params),
            'codebooks': conditioner.codebooks}
  network = conditioner.network
  record = {'format': _FORMAT, 'encoder': module_config(network),
            'num_levels': conditioner.num_levels, 'codebook_size': conditioner.codebook_size,
            'embed_dim': int(network.output_dim), 'window_samples': network.window_samples,
            'hop_samples': network.hop_samples, 'sample_rate': network.sample_rate,
            'params_sha256': fingerprint({'params': params}), **(info or {})}
  return save_model_dir(conditioner_dir, params, record, _RECORD, overwrite=overwrite)


def read_melody_conditioner_record(conditioner_dir: str) -> dict[str, Any]:
  """The melody_conditioner.json of a conditioner directory (checked format)."""
  from musiclm_jax.data.model_dir import read_model_record  # pylint: disable=g-import-not-at-top
  return read_model_record(conditioner_dir, _RECORD, _FORMAT, 'melody conditioner',
                           'fit one with `musiclm-jax fit_melody_conditioner`')


@gin.configurable
def load_melody_conditioner(conditioner_dir: str = gin.REQUIRED, verify: bool = True
                            ) -> MelodyConditioner:
  """The `MelodyConditioner` saved in `conditioner_dir`.

  Its weights are checked against melody_conditioner.json's params_sha256 (`IntegrityError`
  when they differ) unless `verify=False`.
  """
  from musiclm_jax.data.frozen_tokenizer import _restore_numpy  # pylint: disable=g-import-not-at-top
  record = read_melody_conditioner_record(conditioner_dir)
  network = module_from_config(record['encoder'], f'{conditioner_dir}/{_RECORD}: encoder')
  if not isinstance(network, MelodyEncoder):
    raise ValueError(f'{conditioner_dir}/{_RECORD}: the encoder is a {type(network).__name__}, '
                     'not a MelodyEncoder')
  params = _restore_numpy(os.path.join(os.path.abspath(conditioner_dir), 'variables'),
                          {'params': 'params'})['params']
  check_params(params, record, f'the melody conditioner ({conditioner_dir})', verify)
  return MelodyConditioner(network, params['encoder'], params['codebooks'])


# ---------------------------------------------------------------------------
# The conditioning prefix
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ConditioningLayout:
  """MuLan tokens and melody tokens as one conditioning prefix (see the module docstring).

  Attributes:
    mulan_levels: MuLan RVQ levels (12 in the paper).
    mulan_codebook_size: codes per MuLan level (1024).
    melody_levels: melody RVQ levels (24).
    melody_codebook_size: codes per melody level (512).
    melody_windows: melody windows per clip (3 for 10 s).
    offset: the first id of the prefix's vocabulary range.
  """
  mulan_levels: int
  mulan_codebook_size: int
  melody_levels: int
  melody_codebook_size: int
  melody_windows: int
  offset: int = 0

  def __post_init__(self):
    for name in ('mulan_levels', 'mulan_codebook_size', 'melody_levels',
                 'melody_codebook_size', 'melody_windows'):
      if int(getattr(self, name)) < 1:
        raise ValueError(f'ConditioningLayout.{name} must be positive, got '
                         f'{getattr(self, name)}')
    if self.offset < 0:
      raise ValueError(f'ConditioningLayout.offset must be >= 0, got {self.offset}')

  @property
  def melody_offset(self) -> int:
    """The id of melody level 0, code 0."""
    return self.offset + self.mulan_levels * self.mulan_codebook_size

  @property
  def vocab_size(self) -> int:
    """Ids the prefix uses, from `offset`."""
    return (self.mulan_levels * self.mulan_codebook_size +
            self.melody_levels * self.melody_codebook_size)

  @property
  def length(self) -> int:
    """Tokens in the prefix."""
    return self.mulan_levels + self.melody_windows * self.melody_levels

  def _check(self, tokens: np.ndarray, shape: tuple[int, ...], codes: int, what: str):
    if tuple(tokens.shape[1:]) != shape:
      raise ValueError(f'{what} tokens have shape {tokens.shape}, expected [batch, '
                       f'{", ".join(map(str, shape))}] for this ConditioningLayout')
    if tokens.size and (tokens.min() < 0 or tokens.max() >= codes):
      raise ValueError(f'{what} tokens must be in [0, {codes}), got values in '
                       f'[{tokens.min()}, {tokens.max()}]')

  def prefix(self, mulan_tokens: Any, melody_tokens: Any) -> np.ndarray:
    """int32 [batch, length] prefix of MuLan [batch, Lm] and melody [batch, W, Ld] tokens."""
    mulan = np.asarray(mulan_tokens)
    melody = np.asarray(melody_tokens)
    if mulan.ndim == 1 and melody.ndim == 2:  # one clip
      return self.prefix(mulan[None], melody[None])[0]
    self._check(mulan, (self.mulan_levels,), self.mulan_codebook_size, 'MuLan')
    self._check(melody, (self.melody_windows, self.melody_levels), self.melody_codebook_size,
                'melody')
    if mulan.shape[0] != melody.shape[0]:
      raise ValueError(f'{mulan.shape[0]} clips of MuLan tokens, {melody.shape[0]} of melody')
    mulan_ids = (self.offset + np.arange(self.mulan_levels) * self.mulan_codebook_size + mulan)
    melody_ids = (self.melody_offset + np.arange(self.melody_levels) * self.melody_codebook_size
                  + melody)
    return np.concatenate([mulan_ids, melody_ids.reshape(melody.shape[0], -1)],
                          axis=1).astype(np.int32)

  def split(self, prefix: Any) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of `prefix`: (MuLan codes [batch, Lm], melody codes [batch, W, Ld])."""
    prefix = np.asarray(prefix)
    if prefix.ndim != 2 or prefix.shape[1] != self.length:
      raise ValueError(f'prefix has shape {prefix.shape}, expected [batch, {self.length}]')
    mulan = (prefix[:, :self.mulan_levels] - self.offset
             - np.arange(self.mulan_levels) * self.mulan_codebook_size)
    melody = prefix[:, self.mulan_levels:].reshape(-1, self.melody_windows, self.melody_levels)
    melody = (melody - self.melody_offset
              - np.arange(self.melody_levels) * self.melody_codebook_size)
    self._check(mulan, (self.mulan_levels,), self.mulan_codebook_size, 'MuLan (decoded)')
    self._check(melody, (self.melody_windows, self.melody_levels), self.melody_codebook_size,
                'melody (decoded)')
    return mulan.astype(np.int32), melody.astype(np.int32)


# ---------------------------------------------------------------------------
# Fitting from a trained melody run
# ---------------------------------------------------------------------------


def load_melody_run(melody_dir: str, step: Optional[int] = None, partitioner=None
                    ) -> tuple[MelodyEncoder, Any, int]:
  """(encoder, encoder params as numpy, step) of a `musiclm-jax train` melody run directory."""
  from musiclm_jax.melody.model import MelodyModel  # pylint: disable=g-import-not-at-top
  from musiclm_jax.train.loading import load_run  # pylint: disable=g-import-not-at-top

  def batch_spec(model):
    del model
    return {'audio': jax.ShapeDtypeStruct((1, SAMPLE_RATE), np.float32),
            'positive_audio': jax.ShapeDtypeStruct((1, SAMPLE_RATE), np.float32),
            'melody_label': jax.ShapeDtypeStruct((1, 1), np.int32)}

  model, params, _, restored = load_run(melody_dir, MelodyModel, batch_spec, step=step,
                                        partitioner=partitioner, what='melody run')
  network_params = jax.tree_util.tree_map(np.asarray,
                                          nn.meta.unbox(model.network_params(params)))
  return model.network, network_params, restored


@gin.configurable
def fit_melody_conditioner(melody_dir: str = gin.REQUIRED,
                           conditioner_dir: str = gin.REQUIRED,
                           task: str = 'embedded_music', split: str = 'train',
                           num_examples: int = 4096, clip_samples: int = 10 * SAMPLE_RATE,
                           num_levels: int = 24, codebook_size: int = 512, num_iters: int = 50,
                           batch_size: int = 8, seed: int = 0,
                           tfds_data_dir: Optional[str] = None, step: Optional[int] = None,
                           overwrite: bool = False) -> str:
  """Embeds a corpus sample with a trained melody encoder, fits the RVQ, writes a conditioner.

  Each of the first `num_examples` clips of the audio task `task`/`split` (tasks/audio.py, read
  in order, crops seeded by `seed`) is cropped to `clip_samples` (10 s) and all its windows are
  embedded (3 per 10 s clip); the RVQ is fitted on those window embeddings (`fit_rvq`).

  Args:
    melody_dir: a `musiclm-jax train` melody run directory.
    conditioner_dir: where to write the conditioner (must not exist unless `overwrite`).
    task: an audio task giving the clips.
    split: its split.
    num_examples: clips to embed.
    clip_samples: crop per clip.
    num_levels: RVQ levels (24 in the paper).
    codebook_size: codes per level (512 in the paper; at most the number of windows).
    num_iters: Lloyd iterations per level at most.
    batch_size: clips per embedding call.
    seed: crop and k-means seed.
    tfds_data_dir: the TFDS data directory of the corpus.
    step: the run's checkpoint step (None: the latest).
    overwrite: replace an existing conditioner directory.

  Returns:
    The conditioner directory's path.
  """
  if os.path.exists(conditioner_dir) and not overwrite:
    raise FileExistsError(f'{conditioner_dir} exists; pass overwrite=True to replace it')
  from musiclm_jax.data import seqio_input  # pylint: disable=g-import-not-at-top
  network, params, restored = load_melody_run(melody_dir, step)
  conditioner = MelodyConditioner(network, params,
                                  np.zeros((num_levels, 1, network.output_dim), np.float32))
  config = seqio_input.DatasetConfig(
      task, {'audio': int(clip_samples)}, split=split, batch_size=batch_size, shuffle=False,
      seed=seed, module='tasks.audio', tfds_data_dir=tfds_data_dir, feature_converter='audio')
  embeddings, seen = [], 0
  for batch in seqio_input.numpy_batches(
      seqio_input.get_host_dataset(config, num_epochs=1, drop_remainder=False)):
    audio = batch['audio'][:num_examples - seen]
    embeddings.append(conditioner.embed(audio).reshape(-1, network.output_dim))
    seen += len(audio)
    if seen >= num_examples:
      break
  if not embeddings:
    raise ValueError(f'fit_melody_conditioner: task {task!r} split {split!r} gave no clips')
  points = np.concatenate(embeddings)
  codebooks, errors = fit_rvq(points, num_levels, codebook_size, seed=seed, num_iters=num_iters)
  conditioner.codebooks = codebooks
  logger.info('melody RVQ on %d window embeddings of %d clips: squared error per level %s',
              len(points), seen, errors)
  info = {'melody_dir': os.path.abspath(melody_dir), 'melody_step': int(restored),
          'task': task, 'split': split, 'num_clips': int(seen),
          'num_embeddings': int(len(points)), 'clip_samples': int(clip_samples),
          'seed': int(seed), 'squared_error_per_level': errors}
  return save_melody_conditioner(conditioner_dir, conditioner, info, overwrite=overwrite)

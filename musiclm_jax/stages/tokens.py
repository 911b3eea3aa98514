"""The frozen tokenizers of the stage-token cache: semantic, SoundStream, MuLan (+ melody) tokens.

Every stage trains on tokens computed once, offline (`musiclm-jax tokenize`), from each audio crop
of a corpus by three frozen models, four for a melody-conditioned semantic stage
(musiclm_jax/stages/data.py caches them together):

  semantic_tokens  int32 [samples // 960]      `load_semantic_tokenizer` (w2v-BERT + k-means)
  codec_tokens     int32 [frames, 12]          `codec_tokenizer`: SoundStream.encode of a codec
                                               run directory (50 Hz, every RVQ level)
  mulan_tokens     int32 [12]                  `mulan_tokenizer`: MuLanConditioner.audio_tokens
                                               of a conditioner directory, as a Flax module
  melody_tokens    int32 [windows, 24]         `melody_tokenizer`: MelodyConditioner.tokens of a
                                               melody conditioner directory, as a Flax module
                                               (3 windows per 10 s clip; only with melody=True)

Each is a `FrozenTokenizer` (weights from an orbax checkpoint, a parameter fingerprint for the
cache's provenance). `StageTokenizers` builds them from model directories on first use, so a
task module can register a cacheable task at import time even before the models exist; the
directories come from its arguments, else from gin (`stage_token_model_dirs`), else from the
environment (MUSICLM_JAX_SEMANTIC_TOKENIZER_DIR, MUSICLM_JAX_CODEC_DIR,
MUSICLM_JAX_MULAN_CONDITIONER_DIR, MUSICLM_JAX_MELODY_CONDITIONER_DIR), else the tiny models'
usual places under runs/.
"""
from __future__ import annotations

import os
import threading
from typing import Any, Optional, Sequence

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from musiclm_jax.data.frozen_tokenizer import FrozenTokenizer
from musiclm_jax.data.module_records import module_from_config
from musiclm_jax.stages.spec import (CODEC_FEATURE, MELODY_FEATURE, MULAN_FEATURE, SAMPLE_RATE,
                                     SEMANTIC_FEATURE)

Array = jax.Array

ENV_SEMANTIC_TOKENIZER_DIR = 'MUSICLM_JAX_SEMANTIC_TOKENIZER_DIR'
ENV_CODEC_DIR = 'MUSICLM_JAX_CODEC_DIR'
ENV_MULAN_CONDITIONER_DIR = 'MUSICLM_JAX_MULAN_CONDITIONER_DIR'
ENV_MELODY_CONDITIONER_DIR = 'MUSICLM_JAX_MELODY_CONDITIONER_DIR'
DEFAULT_DIRS = {
    'semantic_tokenizer_dir': ('runs/semantic_tokenizer_tiny', ENV_SEMANTIC_TOKENIZER_DIR),
    'codec_dir': ('runs/codec_tiny', ENV_CODEC_DIR),
    'mulan_conditioner_dir': ('runs/mulan_conditioner_tiny', ENV_MULAN_CONDITIONER_DIR),
    'melody_conditioner_dir': ('runs/melody_conditioner_tiny', ENV_MELODY_CONDITIONER_DIR),
}


# ---------------------------------------------------------------------------------------------
# MuLan audio tokens as a Flax module (what MuLanConditioner.audio_tokens computes).


class MuLanAudioTokenizer(nn.Module):
  """MuLan audio embedding (windows averaged) quantized by the conditioner's residual VQ.

  The variables are a conditioner directory's: {'params': {'mulan': <MuLan params>,
  'codebooks': [levels, codes, embed_dim]}} (musiclm_jax/mulan/conditioning.py), so its
  `variables/` checkpoint loads as it is.

  Attributes:
    mulan: the MuLan network (only its audio tower runs).
    num_levels: RVQ levels.
    codebook_size: codes per level.
    window_samples: window of the long-audio averaging (10 s in the paper).
    hop_samples: hop between windows (1 s).
  """
  mulan: nn.Module
  num_levels: int
  codebook_size: int
  window_samples: int
  hop_samples: int

  @property
  def sample_rate(self) -> int:
    return SAMPLE_RATE

  @nn.compact
  def tokenize(self, audio: Array) -> Array:
    """int32 [batch, levels] conditioning tokens of float32 audio [batch, samples]."""
    from musiclm_jax.mulan import losses as mulan_losses  # pylint: disable=g-import-not-at-top
    from musiclm_jax.mulan.conditioning import rvq_encode  # pylint: disable=g-import-not-at-top
    codebooks = self.param('codebooks', nn.initializers.normal(1.0),
                           (self.num_levels, self.codebook_size, self.mulan.embed_dim),
                           jnp.float32)
    emb = mulan_losses.embed_long_audio(self.mulan.embed_audio, audio, self.window_samples,
                                        self.hop_samples)
    return rvq_encode(emb, codebooks)

  def __call__(self, audio: Array) -> Array:
    return self.tokenize(audio)


def mulan_tokenizer(conditioner_dir: str, input_samples: int, output_feature: str = MULAN_FEATURE,
                    batch_size: int = 8, device: Optional[str] = None,
                    verify: bool = True) -> FrozenTokenizer:
  """A FrozenTokenizer of a MuLan conditioner directory: audio -> int32 [batch, levels].

  Its weights are checked against the record's params_sha256 when loaded, unless `verify=False`.
  """
  from musiclm_jax.mulan import conditioning  # pylint: disable=g-import-not-at-top
  record = conditioning.read_conditioner_record(conditioner_dir)
  where = os.path.join(conditioner_dir, 'conditioner.json')
  model = MuLanAudioTokenizer(mulan=module_from_config(record['mulan'], f'{where}: mulan'),
                              num_levels=int(record['num_levels']),
                              codebook_size=int(record['codebook_size']),
                              window_samples=int(record['window_samples']),
                              hop_samples=int(record['hop_samples']))
  return FrozenTokenizer(model=model, output_feature=output_feature, input_samples=input_samples,
                         method='tokenize',
                         checkpoint_dir=os.path.join(os.path.abspath(conditioner_dir),
                                                     'variables'),
                         expected_params_sha256=record.get('params_sha256') if verify else None,
                         batch_size=batch_size, device=device)


# ---------------------------------------------------------------------------------------------
# Melody tokens as a Flax module (what the pipeline computes from a hummed tune).


class MelodyAudioTokenizer(nn.Module):
  """Melody tokens of a clip from its start, as the pipeline's sampling path computes them.

  The pipeline (`Pipeline._melody_tokens_fn`, and the evaluation's `stage_sequences`) gives a
  stage window the melody tokens of `segment_samples` = window + (frames - 1) * hop samples of
  the tune from the window's start, looped when the tune is shorter, embedded window by window
  (`MelodyEncoder.embed_windows`) and quantized by the conditioner's RVQ
  (`MelodyConditioner.tokens`). This module does the same for a cached clip from sample 0, so the
  semantic stage trains on the tokens it is sampled with.

  The variables are a melody conditioner directory's: {'params': {'encoder': <MelodyEncoder
  params>, 'codebooks': [levels, codes, output_dim]}} (musiclm_jax/melody/conditioning.py), so
  its `variables/` checkpoint loads as it is.

  Attributes:
    encoder: the `MelodyEncoder` (its window and hop set the windows).
    num_levels: RVQ levels.
    codebook_size: codes per level.
    num_frames: windows (token frames) per clip: TokenSizes.melody_frames.
  """
  encoder: nn.Module
  num_levels: int
  codebook_size: int
  num_frames: int

  @property
  def sample_rate(self) -> int:
    return SAMPLE_RATE

  @property
  def segment_samples(self) -> int:
    """Samples of audio the tokens describe: window + (frames - 1) * hop."""
    from musiclm_jax.melody.conditioning import segment_samples  # pylint: disable=g-import-not-at-top
    return segment_samples(self.encoder.window_samples, self.encoder.hop_samples,
                           self.num_frames)

  @nn.compact
  def tokenize(self, audio: Array) -> Array:
    """int32 [batch, frames, levels] melody tokens of float32 audio [batch, samples]."""
    from musiclm_jax.mulan.conditioning import rvq_encode  # pylint: disable=g-import-not-at-top
    codebooks = self.param('codebooks', nn.initializers.normal(1.0),
                           (self.num_levels, self.codebook_size, self.encoder.output_dim),
                           jnp.float32)
    # The pipeline's segment from sample 0: looped past the clip's end (static indices).
    from musiclm_jax.melody.conditioning import looped_segment  # pylint: disable=g-import-not-at-top
    segment = looped_segment(audio, 0, self.segment_samples)
    emb = self.encoder.embed_windows(segment)
    return rvq_encode(emb, codebooks)

  def __call__(self, audio: Array) -> Array:
    return self.tokenize(audio)


def melody_tokenizer(conditioner_dir: str, input_samples: int,
                     output_feature: str = MELODY_FEATURE, num_frames: Optional[int] = None,
                     batch_size: int = 8, device: Optional[str] = None,
                     verify: bool = True) -> FrozenTokenizer:
  """A FrozenTokenizer of a melody conditioner directory: audio -> int32 [batch, frames, levels].

  Args:
    conditioner_dir: a `musiclm-jax fit_melody_conditioner` directory.
    input_samples: the clip.
    output_feature: the feature the tokens are written to.
    num_frames: melody windows per clip; None: every whole window of the clip
      (`MelodyConditioner.num_windows(input_samples)`: 3 for 10 s with 4 s windows, 3 s hop).
    batch_size: clips per model call.
    device: platform the model runs on (None: JAX's default).
    verify: check the weights against the record's params_sha256 when they are loaded.
  """
  from musiclm_jax.melody import conditioning  # pylint: disable=g-import-not-at-top
  from musiclm_jax.melody.encoder import MelodyEncoder  # pylint: disable=g-import-not-at-top
  record = conditioning.read_melody_conditioner_record(conditioner_dir)
  encoder = module_from_config(record['encoder'],
                               os.path.join(conditioner_dir, 'melody_conditioner.json: encoder'))
  if not isinstance(encoder, MelodyEncoder):
    raise ValueError(f'{conditioner_dir}: the melody conditioner\'s encoder is a '
                     f'{type(encoder).__name__}, not a MelodyEncoder')
  if num_frames is None:
    num_frames = encoder.num_windows(input_samples)
  if int(num_frames) < 1:
    raise ValueError(f'melody_tokenizer({conditioner_dir}): num_frames must be positive, got '
                     f'{num_frames}')
  model = MelodyAudioTokenizer(encoder=encoder, num_levels=int(record['num_levels']),
                               codebook_size=int(record['codebook_size']),
                               num_frames=int(num_frames))
  return FrozenTokenizer(model=model, output_feature=output_feature, input_samples=input_samples,
                         method='tokenize',
                         checkpoint_dir=os.path.join(os.path.abspath(conditioner_dir),
                                                     'variables'),
                         expected_params_sha256=record.get('params_sha256') if verify else None,
                         batch_size=batch_size, device=device)


# ---------------------------------------------------------------------------------------------
# SoundStream codes of a codec run directory.


class _Reference:

  def __init__(self, name: str, evaluate: bool):
    self.name, self.evaluate = name, evaluate


class _Macro:

  def __init__(self, name: str):
    self.name = name


_DTYPE_CONSTANTS = {'bfloat16': jnp.bfloat16, 'float32': jnp.float32}


def _run_bindings(config_path: str) -> list[Any]:
  """The binding statements of an operative config.gin, parsed without touching gin's state."""
  from gin import config_parser  # pylint: disable=g-import-not-at-top

  class Delegate(config_parser.ParserDelegate):

    def configurable_reference(self, scoped_configurable_name, evaluate):
      return _Reference(scoped_configurable_name, evaluate)

    def macro(self, macro_name):
      return _Macro(macro_name)

  with open(config_path, encoding='utf-8') as f:
    text = f.read()
  return [s for s in config_parser.ConfigParser(text, Delegate())
          if isinstance(s, config_parser.BindingStatement)]


def codec_from_run(codec_dir: str):
  """(SoundStream module, uses EMA weights) rebuilt from a codec run's config.gin.

  The run built its model as MODEL = @CodecModel() with CodecModel.generator = @SoundStream();
  this reads the SoundStream bindings that applied there (unscoped, then MODEL/, then the
  reference's own scope) without parsing the file into gin, so the caller's gin config is left
  alone.
  """
  from musiclm_jax.codec.soundstream import SoundStream  # pylint: disable=g-import-not-at-top
  path = os.path.join(codec_dir, 'config.gin')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path}: not a codec run directory (no operative config.gin); '
                            'train one with `musiclm-jax train --gin_file=runs/train_codec.gin`')
  bindings = _run_bindings(path)
  model_scope = 'MODEL'  # train/loading.load_run builds a run's model under this scope
  generator_scope, ema = '', None
  for b in bindings:
    if b.selector.split('.')[-1] == 'CodecModel' and (b.scope or '') in ('', model_scope):
      if b.arg_name == 'generator' and isinstance(b.value, _Reference):
        generator_scope = b.value.name.rpartition('/')[0]
      elif b.arg_name == 'ema_decay':
        ema = b.value
  scopes = ['', model_scope] + ([f'{model_scope}/{generator_scope}'] if generator_scope else [])
  kwargs = {}
  for scope in scopes:
    for b in bindings:
      if (b.scope or '') == scope and b.selector.split('.')[-1] == 'SoundStream':
        value = b.value
        if isinstance(value, _Macro) and value.name in _DTYPE_CONSTANTS:
          value = _DTYPE_CONSTANTS[value.name]
        elif isinstance(value, (_Macro, _Reference)):
          raise ValueError(f'{path}: SoundStream.{b.arg_name} is bound to a gin '
                           f'{type(value).__name__.strip("_").lower()} ({value.name}), which '
                           'codec_from_run cannot rebuild')
        kwargs[b.arg_name] = value
  kwargs.pop('name', None)
  return SoundStream(**kwargs), bool(ema)


def codec_tokenizer(codec_dir: str, input_samples: int, output_feature: str = CODEC_FEATURE,
                    step: Optional[int] = None, batch_size: int = 8,
                    device: Optional[str] = None) -> FrozenTokenizer:
  """A FrozenTokenizer of a codec run: audio -> SoundStream codes int32 [batch, frames, levels].

  The same codes as `codec.model.encode` of `load_codec(codec_dir)`: the generator's weights
  (its EMA copy when the run kept one) and the RVQ codebooks of the checkpoint `step` (default
  the latest), every level.
  """
  from musiclm_jax.nn.quantizer import STATE_COLLECTION  # pylint: disable=g-import-not-at-top
  model, ema = codec_from_run(codec_dir)
  collections = {STATE_COLLECTION: f'model_state/{STATE_COLLECTION}'}
  if ema:
    collections['params'] = 'model_state/ema_generator'
  return FrozenTokenizer(model=model, output_feature=output_feature, input_samples=input_samples,
                         method='encode', checkpoint_dir=os.path.abspath(codec_dir), step=step,
                         params_group='generator', collections=collections,
                         batch_size=batch_size, device=device)


# ---------------------------------------------------------------------------------------------
# The three (or four, with melody), from model directories, built on first use.


@gin.configurable
def stage_token_model_dirs(semantic_tokenizer_dir: Optional[str] = None,
                           codec_dir: Optional[str] = None,
                           mulan_conditioner_dir: Optional[str] = None,
                           melody_conditioner_dir: Optional[str] = None) -> dict[str, str]:
  """The frozen models of the default stage-token tasks (tasks/stages.py).

  Each None falls back to its environment variable (MUSICLM_JAX_SEMANTIC_TOKENIZER_DIR,
  MUSICLM_JAX_CODEC_DIR, MUSICLM_JAX_MULAN_CONDITIONER_DIR, MUSICLM_JAX_MELODY_CONDITIONER_DIR),
  then to the tiny models' usual directories (runs/semantic_tokenizer_tiny, runs/codec_tiny,
  runs/mulan_conditioner_tiny, runs/melody_conditioner_tiny, relative to the working
  directory). Only the melody tasks (`StageTokenizers(melody=True)`) open the melody
  conditioner.

  Returns:
    {'semantic_tokenizer_dir', 'codec_dir', 'mulan_conditioner_dir', 'melody_conditioner_dir':
    directory}.
  """
  given = {'semantic_tokenizer_dir': semantic_tokenizer_dir, 'codec_dir': codec_dir,
           'mulan_conditioner_dir': mulan_conditioner_dir,
           'melody_conditioner_dir': melody_conditioner_dir}
  return {key: value or os.environ.get(DEFAULT_DIRS[key][1]) or DEFAULT_DIRS[key][0]
          for key, value in given.items()}


class StageTokenizers:
  """The FrozenTokenizers of a stage-token task (semantic, codec, MuLan, [melody]), built lazily.

  Args:
    clip_seconds: the crop the task tokenizes (each tokenizer's input length).
    semantic_tokenizer_dir: a `musiclm-jax fit_kmeans` tokenizer directory.
    codec_dir: a codec run directory (`musiclm-jax train --gin_file=runs/train_codec.gin`).
    mulan_conditioner_dir: a `musiclm-jax fit_conditioner` directory.
    melody: also cache `melody_tokens` (`melody_tokenizer`: every whole melody window of the
      crop), the 'melody' stream of `semantic_stage_spec` with TokenSizes.melody_levels > 0.
    melody_conditioner_dir: a `musiclm-jax fit_melody_conditioner` directory (implies
      `melody`).
    codec_step: the codec checkpoint step (None: the latest).
    extra: more FrozenTokenizers of the same crop, appended after the others.
    batch_size: clips per model call.
    device: platform the models run on (None: JAX's default).
  Directories left None are taken from `stage_token_model_dirs()` when first needed (gin, the
  environment, then runs/..._tiny).
  """

  OUTPUT_RANKS = {SEMANTIC_FEATURE: 1, CODEC_FEATURE: 2, MULAN_FEATURE: 1}
  MELODY_RANK = 2  # [windows, levels]

  def __init__(self, clip_seconds: float, *, semantic_tokenizer_dir: Optional[str] = None,
               codec_dir: Optional[str] = None, mulan_conditioner_dir: Optional[str] = None,
               melody: bool = False, melody_conditioner_dir: Optional[str] = None,
               codec_step: Optional[int] = None, extra: Sequence[FrozenTokenizer] = (),
               batch_size: int = 8, device: Optional[str] = None):
    self.clip_seconds = float(clip_seconds)
    self.dirs = {'semantic_tokenizer_dir': semantic_tokenizer_dir, 'codec_dir': codec_dir,
                 'mulan_conditioner_dir': mulan_conditioner_dir}
    # Only melody tasks name (and open) a melody conditioner, so the other tasks' dirs,
    # tokenizers and cache provenance are what they were before melody tokens existed.
    self.melody = bool(melody or melody_conditioner_dir)
    if self.melody:
      self.dirs['melody_conditioner_dir'] = melody_conditioner_dir
    self.codec_step = codec_step
    self.extra = tuple(extra)
    for t in self.extra:
      if t.input_samples != self.input_samples:
        raise ValueError(f'StageTokenizers: {t!r} takes {t.input_samples} samples, not the '
                         f'{self.input_samples} of a {self.clip_seconds:g} s crop')
    self.batch_size = int(batch_size)
    self.device = device
    self._lock = threading.Lock()
    self._tokenizers: Optional[list[FrozenTokenizer]] = None

  def __getstate__(self):
    state = dict(self.__dict__)
    state['_lock'] = None
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def __repr__(self):
    return f'StageTokenizers({self.clip_seconds:g} s, {self.dirs})'

  @property
  def input_samples(self) -> int:
    return int(round(self.clip_seconds * SAMPLE_RATE))

  def output_ranks(self) -> dict[str, int]:
    """{output feature: rank of one example's tokens}; opens no model directory."""
    ranks = dict(self.OUTPUT_RANKS)
    if self.melody:
      ranks[MELODY_FEATURE] = self.MELODY_RANK
    ranks.update({t.output_feature: len(t.output_spec().shape) for t in self.extra})
    return ranks

  def resolved_dirs(self) -> dict[str, str]:
    """The model directories: the arguments, else `stage_token_model_dirs()`."""
    defaults = stage_token_model_dirs()
    return {key: value or defaults[key] for key, value in self.dirs.items()}

  def frozen_tokenizers(self) -> list[FrozenTokenizer]:
    """[semantic, codec, MuLan, (melody,) *extra] FrozenTokenizers (built once; weights load
    when used).

    Raises:
      FileNotFoundError: a model directory is missing; the message names it, and the gin
        binding and environment variable that set it.
    """
    if self._tokenizers is not None:
      return self._tokenizers
    with self._lock:
      if self._tokenizers is None:
        from musiclm_jax.semantic.tokenizer import load_semantic_tokenizer  # pylint: disable=g-import-not-at-top
        dirs = self.resolved_dirs()
        for key, directory in dirs.items():
          if not os.path.isdir(directory):
            raise FileNotFoundError(
                f'{self!r}: the {key.replace("_dir", "").replace("_", " ")} directory '
                f'{directory!r} does not exist; pass it to the task, bind '
                f'stage_token_model_dirs.{key} in gin, or set ${DEFAULT_DIRS[key][1]}')
        n = self.input_samples
        tokenizers = [
            load_semantic_tokenizer(dirs['semantic_tokenizer_dir'], input_samples=n,
                                    output_feature=SEMANTIC_FEATURE,
                                    batch_size=self.batch_size, device=self.device),
            codec_tokenizer(dirs['codec_dir'], n, step=self.codec_step,
                            batch_size=self.batch_size, device=self.device),
            mulan_tokenizer(dirs['mulan_conditioner_dir'], n, batch_size=self.batch_size,
                            device=self.device),
        ]
        if self.melody:
          tokenizers.append(melody_tokenizer(dirs['melody_conditioner_dir'], n,
                                             batch_size=self.batch_size, device=self.device))
        self._tokenizers = tokenizers + list(self.extra)
    return self._tokenizers

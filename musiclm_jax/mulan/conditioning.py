"""MuLan conditioning tokens: a residual vector quantizer fitted on MuLan audio embeddings.

MusicLM conditions its stages on MuLan tokens: the MuLan embedding of the target audio (training)
or of the text prompt (inference), quantized by one residual VQ (12 levels x 1024 codes in the
paper) fitted on audio embeddings. Because text and audio share MuLan's space, one quantizer
serves both.

The RVQ is fitted level by level with k-means (musiclm_jax/semantic/kmeans.fit_kmeans, k-means++
seeding, Lloyd iterations): level l is the k-means of the residuals left after levels < l. This is
deterministic for a seed. Encoding is greedy: at each level the nearest codeword of the current
residual, then the residual is reduced by it; decoding sums the chosen codewords.

A conditioner directory (written by `save_conditioner`, atomically, never over an existing one
without `overwrite`):

  variables/         orbax PyTree {'params': {'mulan': <the MuLan network's params>,
                                              'codebooks': float32 [levels, codes, embed_dim]}}
  conditioner.json   the MuLan module's configuration (rebuilt by `module_from_config`), levels,
                     codes, window and hop of the long-audio averaging, text length, the text
                     tokenizer ('text_tokenizer': WordPiece, or SentencePiece with the file
                     name and sha256 of its model; a record without it is WordPiece), sample
                     rate, where the weights came from, and the fit's statistics
  text_vocabulary.model   the SentencePiece model of a from-scratch text tower (only then), so
                     the directory is complete wherever it is copied

Typical use:

  fit_conditioner('runs/mulan_tiny', 'runs/mulan_tiny_rvq', task='embedded_music',
                  num_levels=12, codebook_size=64)
  cond = load_conditioner('runs/mulan_tiny_rvq')
  cond.audio_tokens(wav)          # int32 [12]: training the stages (10 s windows, 1 s hop)
  cond.text_tokens(['calm piano'])  # int32 [1, 12]: inference
"""
from __future__ import annotations

import importlib
import logging
import os
from typing import Any, Optional, Sequence

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from musiclm_jax.data.integrity import check_params
from musiclm_jax.data.module_records import module_config, module_from_config
from musiclm_jax.mulan import losses as losses_lib
from musiclm_jax.mulan.model import MuLan

logger = logging.getLogger(__name__)
Array = jax.Array

SAMPLE_RATE = 24000
WINDOW_SAMPLES = 10 * SAMPLE_RATE  # the paper: 10 s windows,
HOP_SAMPLES = SAMPLE_RATE          # 1 s hop, embeddings averaged
_FORMAT = 'musiclm_jax.mulan_conditioner/1'
_RECORD = 'conditioner.json'
_TEXT_VOCABULARY = 'text_vocabulary.model'
WORDPIECE = 'wordpiece'
SENTENCEPIECE = 'sentencepiece'


# ---------------------------------------------------------------------------
# Residual VQ
# ---------------------------------------------------------------------------


def fit_rvq(points: np.ndarray, num_levels: int, codebook_size: int, *, seed: int = 0,
            num_iters: int = 50, mesh=None) -> tuple[np.ndarray, list[float]]:
  """Fits a residual VQ, one k-means per level on the residuals of the levels before.

  Args:
    points: float [N, D] embeddings (N >= codebook_size).
    num_levels: quantizer levels.
    codebook_size: codes per level.
    seed: k-means++ seed (level l uses fold_in(key(seed), l)).
    num_iters: Lloyd iterations per level at most.
    mesh: optional device mesh for k-means (see `fit_kmeans`).

  Returns:
    (codebooks float32 [num_levels, codebook_size, D], the mean squared reconstruction error
    after each level [num_levels]).

  Raises:
    ValueError: bad sizes, fewer points than codes, or non-finite points.
  """
  from musiclm_jax.semantic.kmeans import fit_kmeans  # pylint: disable=g-import-not-at-top
  points = np.asarray(points, np.float32)
  if points.ndim != 2:
    raise ValueError(f'points must be [N, D], got shape {points.shape}')
  if num_levels < 1 or codebook_size < 1:
    raise ValueError(f'num_levels ({num_levels}) and codebook_size ({codebook_size}) must be '
                     'positive')
  if len(points) < codebook_size:
    raise ValueError(f'{len(points)} embeddings cannot fit {codebook_size} codes per level; '
                     'embed more clips or use fewer codes')
  residual = points.copy()
  codebooks, errors = [], []
  key = jax.random.key(seed)
  for level in range(num_levels):
    result = fit_kmeans(residual, codebook_size, num_iters=num_iters,
                        rng=jax.random.fold_in(key, level), mesh=mesh, tol=0.0)
    centroids = np.asarray(result.centroids, np.float32)
    codes = _nearest(residual, centroids)
    residual = residual - centroids[codes]
    codebooks.append(centroids)
    errors.append(float(np.mean(np.sum(np.square(residual), axis=-1))))
  return np.stack(codebooks), errors


def _nearest(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
  d = (np.sum(np.square(x), -1, keepdims=True) - 2.0 * x @ centroids.T
       + np.sum(np.square(centroids), -1)[None, :])
  return np.argmin(d, axis=-1).astype(np.int32)


def rvq_encode(x: Any, codebooks: Any) -> Array:
  """Greedy residual quantization: [..., D] -> int32 codes [..., levels] (jittable)."""
  x = jnp.asarray(x, jnp.float32)
  codebooks = jnp.asarray(codebooks, jnp.float32)
  shape = x.shape[:-1]
  residual = x.reshape(-1, x.shape[-1])
  codes = []
  for level in range(codebooks.shape[0]):
    c = codebooks[level]
    d = (jnp.sum(jnp.square(residual), -1, keepdims=True)
         - 2.0 * jnp.dot(residual, c.T, precision=jax.lax.Precision.HIGHEST)
         + jnp.sum(jnp.square(c), -1)[None, :])
    idx = jnp.argmin(d, axis=-1).astype(jnp.int32)
    residual = residual - c[idx]
    codes.append(idx)
  return jnp.stack(codes, axis=-1).reshape(shape + (codebooks.shape[0],))


def rvq_decode(codes: Any, codebooks: Any) -> Array:
  """Sum of the chosen codewords: int codes [..., levels] -> float32 [..., D]."""
  codes = jnp.asarray(codes, jnp.int32)
  codebooks = jnp.asarray(codebooks, jnp.float32)
  levels = codebooks.shape[0]
  if codes.shape[-1] != levels:
    raise ValueError(f'codes have {codes.shape[-1]} levels, the codebooks {levels}')
  return sum(codebooks[level][codes[..., level]] for level in range(levels))


# ---------------------------------------------------------------------------
# The conditioner
# ---------------------------------------------------------------------------


class MuLanConditioner:
  """A MuLan network and the RVQ over its space: audio and text -> int32 conditioning tokens.

  Attributes:
    network: the `MuLan` module.
    params: its parameters.
    codebooks: float32 [levels, codes, embed_dim].
    window_samples, hop_samples: long-audio windows (10 s, 1 s hop in the paper).
    text_length: text tokens per prompt (with the tokenizer's special tokens).
    text_tokenizer: the tokenizer of the text tower (`WordPieceTokenizer` for all-MiniLM-L6-v2,
      `SentencePieceTokenizer` for a tower trained from scratch over a caption vocabulary);
      loaded on first use when left None (then WordPiece).
  """

  def __init__(self, network: MuLan, params: Any, codebooks: np.ndarray,
               window_samples: int = WINDOW_SAMPLES, hop_samples: int = HOP_SAMPLES,
               text_length: int = 64, text_tokenizer: Any = None):
    """See the class docstring.

    Raises:
      ValueError: when `text_tokenizer` has another number of ids than the text tower's word
        table has rows (it is not the tokenizer the tower was trained with).
    """
    self.network = network
    self.params = jax.device_put(nn.meta.unbox(params))
    self.codebooks = np.asarray(codebooks, np.float32)
    self.window_samples = int(window_samples)
    self.hop_samples = int(hop_samples)
    self.text_length = int(text_length)
    self._tokenizer = None
    if text_tokenizer is not None:
      self._tokenizer = _check_tokenizer(text_tokenizer, network)
    self._embed_audio = jax.jit(lambda p, a: network.apply({'params': p}, a,
                                                           method=MuLan.embed_audio))
    self._embed_text = jax.jit(lambda p, i, m: network.apply({'params': p}, i, m,
                                                             method=MuLan.embed_text))

  @property
  def num_levels(self) -> int:
    return int(self.codebooks.shape[0])

  @property
  def codebook_size(self) -> int:
    return int(self.codebooks.shape[1])

  def embed_audio(self, wav: Any) -> np.ndarray:
    """24 kHz audio [samples] or [batch, samples] -> float32 [(batch,) embed_dim] unit vectors.

    Windows of `window_samples` every `hop_samples` are embedded and averaged
    (`losses.embed_long_audio`); a clip shorter than one window is one zero-padded window.
    """
    wav = np.asarray(wav, np.float32)
    single = wav.ndim == 1
    wav = wav[None] if single else wav
    if wav.ndim != 2:
      raise ValueError(f'wav must be [samples] or [batch, samples], got shape {wav.shape}')
    emb = np.asarray(losses_lib.embed_long_audio(lambda a: self._embed_audio(self.params, a),
                                                 wav, self.window_samples, self.hop_samples))
    return emb[0] if single else emb

  @property
  def text_tokenizer(self) -> Any:
    """The text tower's tokenizer (all-MiniLM-L6-v2's WordPiece unless one was given)."""
    if self._tokenizer is None:
      from musiclm_jax.mulan.text import WordPieceTokenizer  # pylint: disable=g-import-not-at-top
      self._tokenizer = _check_tokenizer(WordPieceTokenizer(), self.network)
    return self._tokenizer

  def embed_text(self, texts: Sequence[str]) -> np.ndarray:
    """Texts -> float32 [len(texts), embed_dim]; an empty text is a ValueError."""
    ids, mask = self.text_tokenizer.encode(texts, self.text_length)
    return np.asarray(self._embed_text(self.params, ids, mask))

  def quantize(self, emb: Any) -> np.ndarray:
    """Embeddings [..., embed_dim] -> int32 tokens [..., levels]."""
    return np.asarray(rvq_encode(emb, self.codebooks))

  def audio_tokens(self, wav: Any) -> np.ndarray:
    """Conditioning tokens of audio (training the stages): int32 [levels] or [batch, levels]."""
    return self.quantize(self.embed_audio(wav))

  def text_tokens(self, texts: Sequence[str]) -> np.ndarray:
    """Conditioning tokens of text prompts (inference): int32 [len(texts), levels]."""
    return self.quantize(self.embed_text(texts))


def _check_tokenizer(tokenizer: Any, network: MuLan) -> Any:
  """`tokenizer`, once its number of ids is checked against the text tower's word table."""
  rows = network.text_tower.vocab_size
  if int(tokenizer.vocab_size) != int(rows):
    raise ValueError(
        f'the text tokenizer ({type(tokenizer).__name__}, {tokenizer.vocab_size} ids) does not '
        f'fit the MuLan text tower (a word table of {rows} rows): it is not the tokenizer the '
        'tower was trained with (WordPiece for all-MiniLM-L6-v2, the SentencePiece caption '
        'vocabulary of its *_mulan_sp task for a tower trained from scratch)')
  return tokenizer


def _text_tokenizer_record(tokenizer: Any) -> tuple[dict[str, Any], dict[str, bytes]]:
  """(conditioner.json's 'text_tokenizer' entry, the files that go with it)."""
  from musiclm_jax.mulan.vocabulary import SentencePieceTokenizer  # pylint: disable=g-import-not-at-top
  if isinstance(tokenizer, SentencePieceTokenizer):
    return ({'type': SENTENCEPIECE, 'file': _TEXT_VOCABULARY, 'sha256': tokenizer.sha256,
             'vocab_size': tokenizer.vocab_size, 'source': tokenizer.path},
            {_TEXT_VOCABULARY: tokenizer.model_proto})
  return {'type': WORDPIECE, 'vocab_size': int(tokenizer.vocab_size)}, {}


def _text_tokenizer_from_record(conditioner_dir: str, record: dict[str, Any]) -> Any:
  """The tokenizer a conditioner.json names (no entry: WordPiece, the only one before)."""
  entry = record.get('text_tokenizer') or {'type': WORDPIECE}
  where = os.path.join(conditioner_dir, _RECORD)
  if entry.get('type') == WORDPIECE:
    from musiclm_jax.mulan.text import WordPieceTokenizer  # pylint: disable=g-import-not-at-top
    return WordPieceTokenizer()
  if entry.get('type') == SENTENCEPIECE:
    from musiclm_jax.mulan.vocabulary import SentencePieceTokenizer  # pylint: disable=g-import-not-at-top
    path = os.path.join(conditioner_dir, os.path.basename(entry.get('file', _TEXT_VOCABULARY)))
    if not os.path.isfile(path):
      raise FileNotFoundError(f'{where} names the SentencePiece vocabulary {path}, which is '
                              'missing: the conditioner directory is incomplete')
    tokenizer = SentencePieceTokenizer(path)
    if entry.get('sha256') and tokenizer.sha256 != entry['sha256']:
      raise ValueError(f'{path}: sha256 {tokenizer.sha256} is not the {entry["sha256"]} that '
                       f'{where} recorded: the vocabulary was replaced')
    return tokenizer
  raise ValueError(f"{where}: unknown text_tokenizer type {entry.get('type')!r} (expected "
                   f'{WORDPIECE!r} or {SENTENCEPIECE!r})')


def save_conditioner(conditioner_dir: str, conditioner: MuLanConditioner,
                     info: Optional[dict[str, Any]] = None, overwrite: bool = False) -> str:
  """Writes a conditioner directory atomically (see the module docstring); returns its path.

  The conditioner's text tokenizer is recorded (and a SentencePiece model copied in). An
  existing directory is only replaced with `overwrite`, and then only once the new one is
  completely written (the old one is moved aside and put back if the replacement fails).
  """
  from musiclm_jax.data.frozen_tokenizer import fingerprint  # pylint: disable=g-import-not-at-top
  from musiclm_jax.data.model_dir import save_model_dir  # pylint: disable=g-import-not-at-top
  params = {'mulan': jax.tree_util.tree_map(np.asarray, conditioner.params),
            'codebooks': conditioner.codebooks}
  tokenizer, files = _text_tokenizer_record(conditioner.text_tokenizer)
  record = {'format': _FORMAT, 'mulan': module_config(conditioner.network),
            'num_levels': conditioner.num_levels, 'codebook_size': conditioner.codebook_size,
            'window_samples': conditioner.window_samples,
            'hop_samples': conditioner.hop_samples, 'text_length': conditioner.text_length,
            'text_tokenizer': tokenizer,
            'sample_rate': SAMPLE_RATE, 'params_sha256': fingerprint({'params': params}),
            **(info or {})}
  return save_model_dir(conditioner_dir, params, record, _RECORD, overwrite=overwrite,
                        extra_files=files)


def read_conditioner_record(conditioner_dir: str) -> dict[str, Any]:
  """The conditioner.json of a conditioner directory (checked format)."""
  from musiclm_jax.data.model_dir import read_model_record  # pylint: disable=g-import-not-at-top
  return read_model_record(conditioner_dir, _RECORD, _FORMAT, 'MuLan conditioner',
                           'fit one with `fit_conditioner`')


@gin.configurable
def load_conditioner(conditioner_dir: str = gin.REQUIRED, verify: bool = True
                     ) -> MuLanConditioner:
  """The `MuLanConditioner` saved in `conditioner_dir`.

  Its weights are checked against conditioner.json's params_sha256 (`IntegrityError` when they
  differ) unless `verify=False`.
  """
  from musiclm_jax.data.frozen_tokenizer import _restore_numpy  # pylint: disable=g-import-not-at-top
  record = read_conditioner_record(conditioner_dir)
  conditioner_dir = os.path.abspath(conditioner_dir)
  network = module_from_config(record['mulan'], f'{conditioner_dir}/{_RECORD}: mulan')
  params = _restore_numpy(os.path.join(conditioner_dir, 'variables'),
                          {'params': 'params'})['params']
  check_params(params, record, f'the MuLan conditioner ({conditioner_dir})', verify)
  return MuLanConditioner(network, params['mulan'], params['codebooks'],
                          record['window_samples'], record['hop_samples'], record['text_length'],
                          _text_tokenizer_from_record(conditioner_dir, record))


def audio_tokens(conditioner_dir: str, wav: Any) -> np.ndarray:
  """MuLan audio tokens int32 [levels] ([batch, levels]) of 24 kHz audio [samples] ([batch, ...])."""
  return load_conditioner(conditioner_dir).audio_tokens(wav)


def text_tokens(conditioner_dir: str, texts: Sequence[str]) -> np.ndarray:
  """MuLan text tokens int32 [len(texts), levels] through the same quantizer as the audio's."""
  return load_conditioner(conditioner_dir).text_tokens(texts)


# ---------------------------------------------------------------------------
# Fitting from a trained MuLan run
# ---------------------------------------------------------------------------


def load_mulan(mulan_dir: str, step: Optional[int] = None, partitioner=None,
               text_length: int = 64) -> tuple[MuLan, Any, int]:
  """(network, network params as numpy, step) of a `musiclm-jax train` MuLan run directory."""
  from musiclm_jax.mulan.model import MuLanModel  # pylint: disable=g-import-not-at-top
  from musiclm_jax.train.loading import load_run  # pylint: disable=g-import-not-at-top

  def batch_spec(model):
    del model
    return {'audio': jax.ShapeDtypeStruct((1, SAMPLE_RATE), np.float32),
            'text_ids': jax.ShapeDtypeStruct((1, text_length), np.int32),
            'text_mask': jax.ShapeDtypeStruct((1, text_length), np.int32)}

  model, params, _, restored = load_run(mulan_dir, MuLanModel, batch_spec, step=step,
                                        partitioner=partitioner, what='MuLan run')
  network_params = jax.tree_util.tree_map(
      np.asarray, nn.meta.unbox(model.network_params(params)))
  return model.network, network_params, restored


def run_text_tokenizer() -> Any:
  """The text tokenizer of the MuLan run whose config.gin gin holds (after `load_mulan`).

  The run's training task (`train/DatasetConfig`) names it: a SentencePiece vocabulary carried by
  its 'text_ids' feature (the *_mulan_sp tasks) gives a `SentencePieceTokenizer`; any other task,
  or a config without a training task, gives all-MiniLM-L6-v2's `WordPieceTokenizer`.
  """
  import seqio  # pylint: disable=g-import-not-at-top
  from musiclm_jax.data import seqio_input  # pylint: disable=g-import-not-at-top
  from musiclm_jax.mulan.text import WordPieceTokenizer  # pylint: disable=g-import-not-at-top
  from musiclm_jax.mulan.vocabulary import SentencePieceTokenizer  # pylint: disable=g-import-not-at-top
  try:
    with gin.config_scope('train'):
      config = seqio_input.DatasetConfig()  # pylint: disable=no-value-for-parameter
  except (TypeError, ValueError) as e:
    logger.warning('the run config names no training task (%s); using WordPiece text tokens',
                   str(e).splitlines()[0])
    return WordPieceTokenizer()
  try:
    if config.module:
      importlib.import_module(config.module)
    task = seqio.get_mixture_or_task(config.mixture_or_task_name)
  except (ImportError, ValueError) as e:
    raise ValueError(f"cannot tell the run's text tokenizer from its training task "
                     f'{config.mixture_or_task_name!r} ({e}); pass '
                     'fit_conditioner.text_vocabulary') from e
  feature = task.output_features.get('text_ids')
  vocabulary = getattr(feature, 'vocabulary', None)
  if isinstance(vocabulary, seqio.SentencePieceVocabulary):
    return SentencePieceTokenizer(vocabulary)
  return WordPieceTokenizer()


@gin.configurable
def fit_conditioner(mulan_dir: str = gin.REQUIRED, conditioner_dir: str = gin.REQUIRED,
                    task: str = 'embedded_music', split: str = 'train',
                    num_examples: int = 4096, clip_samples: Optional[int] = None,
                    window_samples: int = WINDOW_SAMPLES, hop_samples: int = HOP_SAMPLES,
                    num_levels: int = 12, codebook_size: int = 1024, num_iters: int = 50,
                    text_length: int = 64, batch_size: int = 8, seed: int = 0,
                    tfds_data_dir: Optional[str] = None, step: Optional[int] = None,
                    text_vocabulary: Optional[str] = None, overwrite: bool = False) -> str:
  """Embeds a corpus sample with a trained MuLan, fits the RVQ, writes a conditioner directory.

  Each of the first `num_examples` clips of the audio task `task`/`split` (read in order, crops
  seeded by `seed`) is cropped to `clip_samples` (default one window: a clip shorter than that is
  zero-padded, and the padding would be embedded with it) and embedded as `audio_tokens` would
  (windows averaged); the RVQ is fitted on those embeddings (`fit_rvq`). The conditioner keeps
  the text tokenizer the run trained with (`run_text_tokenizer`, or `text_vocabulary`).

  Args:
    mulan_dir: a `musiclm-jax train` MuLan run directory.
    conditioner_dir: where to write the conditioner (must not exist unless `overwrite`).
    task: an audio task (tasks/audio.py) giving the clips.
    split: its split.
    num_examples: clips to embed (at least `codebook_size`).
    clip_samples: crop per clip (default `window_samples`).
    window_samples: window of the long-audio averaging (10 s in the paper).
    hop_samples: hop between windows (1 s in the paper).
    num_levels: RVQ levels (12 in the paper).
    codebook_size: codes per level (1024 in the paper).
    num_iters: Lloyd iterations per level at most.
    text_length: text tokens per prompt for `text_tokens` (with the special tokens).
    batch_size: clips per embedding call.
    seed: crop and k-means seed.
    tfds_data_dir: the TFDS data directory of the corpus.
    step: the checkpoint step of the run (None: the latest).
    text_vocabulary: the SentencePiece .model the run's text tower was trained over; None:
      the one of the run's training task, else WordPiece (`run_text_tokenizer`).
    overwrite: replace an existing conditioner directory.

  Returns:
    The conditioner directory's path.
  """
  if os.path.exists(conditioner_dir) and not overwrite:
    raise FileExistsError(f'{conditioner_dir} exists; pass overwrite=True to replace it')
  clip_samples = int(clip_samples or window_samples)
  from musiclm_jax.data import seqio_input  # pylint: disable=g-import-not-at-top
  network, params, restored = load_mulan(mulan_dir, step, text_length=text_length)
  if text_vocabulary:
    from musiclm_jax.mulan.vocabulary import SentencePieceTokenizer  # pylint: disable=g-import-not-at-top
    tokenizer = SentencePieceTokenizer(text_vocabulary)
  else:
    tokenizer = run_text_tokenizer()  # reads the run's config.gin, which load_mulan parsed
  conditioner = MuLanConditioner(network, params, np.zeros((num_levels, 1, network.embed_dim)),
                                 window_samples, hop_samples, text_length, tokenizer)
  config = seqio_input.DatasetConfig(
      task, {'audio': clip_samples}, split=split, batch_size=batch_size, shuffle=False,
      seed=seed, module='tasks.audio', tfds_data_dir=tfds_data_dir, feature_converter='audio')
  embeddings, seen = [], 0
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  with tqdm(total=num_examples, desc='fit_conditioner: embed', unit='clip',
            dynamic_ncols=True) as bar:
    for batch in seqio_input.numpy_batches(
        seqio_input.get_host_dataset(config, num_epochs=1, drop_remainder=False)):
      audio = batch['audio'][:num_examples - seen]
      embeddings.append(conditioner.embed_audio(audio))
      seen += len(audio)
      bar.update(len(audio))
      if seen >= num_examples:
        break
  if seen < codebook_size:
    raise ValueError(f'fit_conditioner: {task}/{split} gave {seen} clips, fewer than '
                     f'codebook_size={codebook_size}; lower codebook_size or add data')
  points = np.concatenate(embeddings)
  codebooks, errors = fit_rvq(points, num_levels, codebook_size, seed=seed, num_iters=num_iters)
  conditioner.codebooks = codebooks
  logger.info('MuLan RVQ on %d embeddings: squared error per level %s', len(points), errors)
  info = {'mulan_dir': os.path.abspath(mulan_dir), 'mulan_step': int(restored),
          'task': task, 'split': split, 'num_embeddings': int(len(points)),
          'clip_samples': int(clip_samples), 'seed': int(seed),
          'squared_error_per_level': errors}
  return save_conditioner(conditioner_dir, conditioner, info, overwrite=overwrite)

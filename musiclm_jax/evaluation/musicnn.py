"""musicnn (Pons & Serra, 2019) in JAX: an offline music tagger and embedding for FAD and KLD.

A port of the `musicnn` package's (PyPI musicnn==0.1.0, ISC licence) 'MTT_musicnn' model
(MagnaTagATune, 50 tags) and 'MSD_musicnn' (Million Song Dataset, 50 tags), with the weights read
straight from the TF1 checkpoints the package ships (a TF checkpoint reader, no pickle). The
package itself is TF1 code (tf.layers, placeholders) that no longer builds under Keras 3; the
tests check this port against the package's own saved TF graph (its `.meta` file) run by
TensorFlow.

Pipeline, as musicnn's extractor.py and models.py:
1. Audio (ours is 24 kHz) -> 16 kHz with librosa.resample (soxr_hq, what librosa.load does).
2. Mel power spectrogram: librosa, n_fft 512, hop 256, 96 mel bands (Slaney), rounded to
   float16, then log10(10000 x + 1), also in float16, as musicnn does.
3. Non-overlapping patches of 187 frames (3 s); the tail shorter than a patch is dropped.
4. The network: a batch-normalised input; timbral convolutions (7x38 and 7x67 over mel) and
   temporal ones (128, 64, 32 frames), each ReLU -> batch norm -> max over frequency (561
   channels); three 7-frame convolutions with residual connections (3 x 64); max and mean over
   time of the 753 concatenated channels; dense 200 (ReLU, batch norm) = 'penultimate'; dense 50
   -> sigmoid = tag probabilities. Batch norm always in inference mode (moving statistics,
   epsilon 1e-3), dropout off, as in musicnn's extractor (is_training=False).

One deliberate difference: musicnn computes 10000 x in float16, which overflows to inf when a mel
band's power exceeds 6.55 (a tone above about -18 dBFS: half the clips of our rendered corpus),
and the original graph then returns inf 'max_pool' features and the same tag vector whatever the
audio. Where (and only where) that happens, the log is computed in float32 and rounded to
float16; everywhere else the input is bit-identical to musicnn's.

Which embedding FAD uses: 'penultimate' (200-d) by default. It is the representation the model
trained to separate the 50 tags linearly (the analogue of the VGGish embedding in the original
FAD, or Inception's pool3 in FID); it is batch-normalised, so its units are on comparable scales;
and a 200-d Gaussian fit is far better conditioned on the tens to hundreds of clips of our
evaluation sets than the 753-d 'max_pool' (musicnn's usual transfer feature), whose covariance
is singular below 754 clips and whose FAD bias grows with dimension over sample count.
'max_pool' and 'mean_pool' are available (feature=...).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
from typing import Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

SAMPLE_RATE = 16000
FFT_SIZE = 512
FFT_HOP = 256
N_MELS = 96
PATCH_SECONDS = 3.0
# librosa.time_to_frames(3, sr=16000, n_fft=512, hop_length=256) + 1, as musicnn's extractor.
PATCH_FRAMES = 187
BATCH_NORM_EPSILON = 1e-3
DEFAULT_INPUT_SAMPLE_RATE = 24000

# musicnn/configuration.py (checked against the installed package by the tests).
MTT_TAGS = (
    'guitar', 'classical', 'slow', 'techno', 'strings', 'drums', 'electronic', 'rock', 'fast',
    'piano', 'ambient', 'beat', 'violin', 'vocal', 'synth', 'female', 'indian', 'opera', 'male',
    'singing', 'vocals', 'no vocals', 'harpsichord', 'loud', 'quiet', 'flute', 'woman',
    'male vocal', 'no vocal', 'pop', 'soft', 'sitar', 'solo', 'man', 'classic', 'choir', 'voice',
    'new age', 'dance', 'male voice', 'female vocal', 'beats', 'harp', 'cello', 'no voice',
    'weird', 'country', 'metal', 'female voice', 'choral')
MSD_TAGS = (
    'rock', 'pop', 'alternative', 'indie', 'electronic', 'female vocalists', 'dance', '00s',
    'alternative rock', 'jazz', 'beautiful', 'metal', 'chillout', 'male vocalists',
    'classic rock', 'soul', 'indie rock', 'Mellow', 'electronica', '80s', 'folk', '90s', 'chill',
    'instrumental', 'punk', 'oldies', 'blues', 'hard rock', 'ambient', 'acoustic', 'experimental',
    'female vocalist', 'guitar', 'Hip-Hop', '70s', 'party', 'country', 'easy listening', 'sexy',
    'catchy', 'funk', 'electro', 'heavy metal', 'Progressive rock', '60s', 'rnb', 'indie pop',
    'sad', 'House', 'happy')
TAGS = {'MTT_musicnn': MTT_TAGS, 'MSD_musicnn': MSD_TAGS}
MODELS = tuple(TAGS)
FEATURES = ('penultimate', 'max_pool', 'mean_pool')
FEATURE_DIMS = {'penultimate': 200, 'max_pool': 753, 'mean_pool': 753}

Params = Mapping[str, jax.Array]
Audio = Union[np.ndarray, Sequence[np.ndarray]]


class MusicnnNotInstalledError(ImportError):
  """The musicnn package (which holds the weights) is missing."""


def checkpoint_prefix(model: str = 'MTT_musicnn') -> str:
  """The TF checkpoint prefix of a musicnn model inside the installed package.

  The package's checkpoints have an empty basename (files `MTT_musicnn/.index`,
  `MTT_musicnn/.data-00000-of-00001`), and their `checkpoint` files name the author's machine, so
  the prefix is the model folder with a trailing separator.

  Args:
    model: 'MTT_musicnn' or 'MSD_musicnn'.

  Returns:
    The prefix, for a TF checkpoint reader.
  """
  if model not in MODELS:
    raise ValueError(f'model={model!r}; the port covers {MODELS}')
  # find_spec locates the package without importing it (musicnn's extractor disables TF's eager
  # mode at import time; configuration.py alone is harmless).
  spec = importlib.util.find_spec('musicnn')
  if spec is None or not spec.submodule_search_locations:
    raise MusicnnNotInstalledError(
        'the musicnn package holds the model weights: `pip install --no-deps musicnn==0.1.0` '
        '(`make setup` installs it from requirements-nodeps.txt)')
  folder = os.path.join(list(spec.submodule_search_locations)[0], model)
  if not os.path.exists(os.path.join(folder, '.index')):
    raise FileNotFoundError(f'no checkpoint for {model} in {folder} (expected the files .index '
                            'and .data-00000-of-00001 of musicnn 0.1.0)')
  return folder + os.sep


# Checkpoint variable -> shape of the musicnn architecture (num_filt_midend=64, 200 units).
def _expected_shapes(num_classes: int) -> dict[str, tuple[int, ...]]:
  shapes = {
      'conv2d/kernel': (7, 38, 1, 204), 'conv2d_1/kernel': (7, 67, 1, 204),
      'conv2d_2/kernel': (128, 1, 1, 51), 'conv2d_3/kernel': (64, 1, 1, 51),
      'conv2d_4/kernel': (32, 1, 1, 51), 'conv2d_5/kernel': (7, 561, 1, 64),
      'conv2d_6/kernel': (7, 64, 1, 64), 'conv2d_7/kernel': (7, 64, 1, 64),
      'dense/kernel': (1506, 200), 'dense_1/kernel': (200, num_classes),
  }
  for name, shape in list(shapes.items()):
    shapes[name.replace('kernel', 'bias')] = (shape[-1],)
  bn_sizes = [1, 204, 204, 51, 51, 51, 64, 64, 64, 1506, 200]
  for i, size in enumerate(bn_sizes):
    prefix = 'batch_normalization' + (f'_{i}' if i else '')
    for var in ('gamma', 'beta', 'moving_mean', 'moving_variance'):
      shapes[f'{prefix}/{var}'] = (size,)
  return shapes


def load_params(model: str = 'MTT_musicnn') -> dict[str, np.ndarray]:
  """The inference weights of a musicnn model, by their TF variable names (Adam slots dropped).

  Args:
    model: 'MTT_musicnn' or 'MSD_musicnn'.

  Returns:
    float32 arrays keyed as in the checkpoint, e.g. 'conv2d/kernel' [7, 38, 1, 204] (HWIO) or
    'batch_normalization_10/moving_variance' [200].
  """
  prefix = checkpoint_prefix(model)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  reader = tf.compat.v1.train.NewCheckpointReader(prefix)
  expected = _expected_shapes(len(TAGS[model]))
  available = reader.get_variable_to_shape_map()
  params = {}
  for name, shape in expected.items():
    if name not in available:
      raise ValueError(f'{prefix}: variable {name} missing from the checkpoint')
    value = np.asarray(reader.get_tensor(name), np.float32)
    if value.shape != shape:
      raise ValueError(f'{prefix}: {name} has shape {value.shape}, expected {shape}')
    params[name] = value
  return params


def log_mel(audio_16k: np.ndarray) -> np.ndarray:
  """musicnn's input representation of a 16 kHz mono signal: [frames, 96] float32.

  librosa's mel power spectrogram (n_fft 512, hop 256, 96 bands), rounded to float16, then
  log10(10000 x + 1) in float16 as in musicnn's extractor.batch_data, except where float16
  overflows there (see the module docstring): those entries are computed in float32.
  """
  import librosa  # pylint: disable=g-import-not-at-top
  audio_16k = np.asarray(audio_16k, np.float32)
  mel = librosa.feature.melspectrogram(y=audio_16k, sr=SAMPLE_RATE, hop_length=FFT_HOP,
                                       n_fft=FFT_SIZE, n_mels=N_MELS).T
  mel16 = mel.astype(np.float16)
  with np.errstate(over='ignore'):
    log16 = np.log10(10000 * mel16 + 1)
  overflow = ~np.isfinite(log16)
  if overflow.any():
    log16[overflow] = np.log10(10000 * mel16[overflow].astype(np.float32) + 1).astype(np.float16)
  return log16.astype(np.float32)


def patches_from_log_mel(log_mel_frames: np.ndarray) -> np.ndarray:
  """Non-overlapping [num_patches, 187, 96] patches of a log-mel (the tail is dropped)."""
  num_frames = log_mel_frames.shape[0]
  starts = range(0, num_frames - PATCH_FRAMES + 1, PATCH_FRAMES)
  return np.stack([log_mel_frames[s:s + PATCH_FRAMES] for s in starts]) if len(starts) else (
      np.zeros((0, PATCH_FRAMES, N_MELS), np.float32))


def min_input_samples(sample_rate: int) -> int:
  """The fewest samples at `sample_rate` that give one patch (about 2.98 s)."""
  return int(np.ceil((PATCH_FRAMES - 1) * FFT_HOP * sample_rate / SAMPLE_RATE))


def to_float_mono(wav: np.ndarray, name: str) -> np.ndarray:
  """A clip as float32 mono in [-1, 1]: integer PCM is scaled, [channels, samples] averaged."""
  wav = np.asarray(wav)
  if np.issubdtype(wav.dtype, np.integer):
    wav = wav.astype(np.float32) / float(-np.iinfo(wav.dtype).min)
  elif not np.issubdtype(wav.dtype, np.floating):
    raise ValueError(f'{name}: audio must be numeric, got dtype {wav.dtype}')
  if wav.ndim == 2:  # [channels, samples], as librosa.load(mono=True) downmixes
    wav = wav.mean(axis=0)
  if wav.ndim != 1:
    raise ValueError(f'{name}: expected a 1-D signal (or [channels, samples]), got shape '
                     f'{wav.shape}')
  wav = wav.astype(np.float32)
  if not np.isfinite(wav).all():
    raise ValueError(f'{name}: NaN/inf samples')
  return wav


def audio_patches(wav: np.ndarray, sample_rate: int = DEFAULT_INPUT_SAMPLE_RATE,
                  name: str = 'clip') -> np.ndarray:
  """One clip -> its [num_patches, 187, 96] musicnn input patches (resampled to 16 kHz).

  Args:
    wav: mono samples (float in [-1, 1], or integer PCM).
    sample_rate: the clip's sample rate.
    name: what to call the clip in error messages.

  Returns:
    float32 log-mel patches; at least one (shorter clips raise ValueError).
  """
  import librosa  # pylint: disable=g-import-not-at-top
  wav = to_float_mono(wav, name)
  if wav.shape[0] < min_input_samples(sample_rate):
    raise ValueError(f'{name}: {wav.shape[0] / sample_rate:.3f} s is shorter than one musicnn '
                     f'patch ({min_input_samples(sample_rate)} samples at {sample_rate} Hz)')
  if sample_rate != SAMPLE_RATE:
    wav = librosa.resample(wav, orig_sr=sample_rate, target_sr=SAMPLE_RATE, res_type='soxr_hq')
  patches = patches_from_log_mel(log_mel(wav))
  if not patches.shape[0]:  # resampling may round a borderline clip below one patch
    raise ValueError(f'{name}: {wav.shape[0]} samples at 16 kHz give no full 3 s patch')
  return patches


_HIGHEST = jax.lax.Precision.HIGHEST


def _batch_norm(params: Params, index: int, x: jax.Array) -> jax.Array:
  """tf.layers.batch_normalization(training=False) over the last axis."""
  prefix = 'batch_normalization' + (f'_{index}' if index else '')
  scale = params[f'{prefix}/gamma'] * jax.lax.rsqrt(
      params[f'{prefix}/moving_variance'] + BATCH_NORM_EPSILON)
  return (x - params[f'{prefix}/moving_mean']) * scale + params[f'{prefix}/beta']


def _conv2d_relu(params: Params, name: str, x: jax.Array, padding: str) -> jax.Array:
  """tf.layers.conv2d(activation=relu) in NHWC with the checkpoint's HWIO kernel."""
  y = jax.lax.conv_general_dilated(x, params[f'{name}/kernel'], (1, 1), padding,
                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=_HIGHEST)
  return jax.nn.relu(y + params[f'{name}/bias'])


def _pad_time(x: jax.Array, before: int = 3, after: int = 3) -> jax.Array:
  return jnp.pad(x, [(0, 0), (before, after)] + [(0, 0)] * (x.ndim - 2))


def forward(params: Params, patches: jax.Array) -> dict[str, jax.Array]:
  """The musicnn network on [batch, 187, 96] log-mel patches (any number of frames works).

  Args:
    params: load_params' weights (numpy or jax arrays).
    patches: log-mel patches (audio_patches).

  Returns:
    'logits' [batch, num_tags], 'tags' (sigmoid of the logits), 'penultimate' [batch, 200],
    'max_pool' and 'mean_pool' [batch, 753]: musicnn's outputs of the same names.
  """
  x = _batch_norm(params, 0, patches[..., None])                      # [B, T, 96, 1]
  padded = _pad_time(x)
  frontend = []
  # Timbral blocks: 7 frames x 38 / 67 mel bands, valid in frequency, then max over frequency.
  for index, name in ((1, 'conv2d'), (2, 'conv2d_1')):
    frontend.append(jnp.max(_batch_norm(params, index, _conv2d_relu(params, name, padded,
                                                                     'VALID')), axis=2))
  # Temporal blocks: 128 / 64 / 32 frames x 1 band, 'SAME' (TF's padding for even kernels:
  # one frame more after than before, which lax's 'SAME' reproduces).
  for index, name in ((3, 'conv2d_2'), (4, 'conv2d_3'), (5, 'conv2d_4')):
    frontend.append(jnp.max(_batch_norm(params, index, _conv2d_relu(params, name, x, 'SAME')),
                            axis=2))
  frontend_features = jnp.concatenate(frontend, axis=-1)              # [B, T, 561]

  def midend_layer(index: int, name: str, h: jax.Array) -> jax.Array:
    # A [7, C] kernel spanning all C channels of an [B, T, C, 1] map, as musicnn writes it.
    y = _conv2d_relu(params, name, _pad_time(h[..., None]), 'VALID')  # [B, T, 1, 64]
    return _batch_norm(params, index, y[:, :, 0, :])

  cnn1 = midend_layer(6, 'conv2d_5', frontend_features)
  cnn2 = midend_layer(7, 'conv2d_6', cnn1) + cnn1
  cnn3 = midend_layer(8, 'conv2d_7', cnn2) + cnn2
  midend_features = jnp.concatenate([frontend_features, cnn1, cnn2, cnn3], axis=-1)  # [B, T, 753]

  max_pool = jnp.max(midend_features, axis=1)
  mean_pool = jnp.mean(midend_features, axis=1)
  # musicnn concatenates [B, 753, 1] max and mean maps on the last axis and flattens: the dense
  # layer sees them interleaved (max_0, mean_0, max_1, mean_1, ...).
  pooled = jnp.stack([max_pool, mean_pool], axis=-1).reshape(max_pool.shape[0], -1)
  pooled = _batch_norm(params, 9, pooled)
  dense = jax.nn.relu(jnp.dot(pooled, params['dense/kernel'], precision=_HIGHEST)
                      + params['dense/bias'])
  penultimate = _batch_norm(params, 10, dense)
  logits = jnp.dot(penultimate, params['dense_1/kernel'], precision=_HIGHEST) + params[
      'dense_1/bias']
  return {'logits': logits, 'tags': jax.nn.sigmoid(logits), 'penultimate': penultimate,
          'max_pool': max_pool, 'mean_pool': mean_pool}


@dataclasses.dataclass(frozen=True)
class ClipOutputs:
  """Clip-level outputs: per-patch outputs averaged over each clip's patches.

  Attributes:
    embeddings: [num_clips, d] the chosen feature (MusicnnEmbedder.feature).
    tags: [num_clips, num_tags] tag probabilities (musicnn's clip tags: the taggram's mean).
    num_patches: [num_clips] patches per clip.
  """
  embeddings: np.ndarray
  tags: np.ndarray
  num_patches: np.ndarray


class MusicnnEmbedder:
  """musicnn tags and embeddings of audio clips, in JAX.

  embedder = MusicnnEmbedder()                 # MTT_musicnn, 'penultimate', 24 kHz input
  emb = embedder.embed(wavs)                   # [n, 200], for fad()
  probs = embedder.tags(wavs)                  # [n, 50], names in embedder.tag_names

  Each clip is cut into 3 s patches; clip outputs are means over its patches (clips may differ
  in length; each must be at least about 3 s).
  """

  def __init__(self, model: str = 'MTT_musicnn', feature: str = 'penultimate',
               input_sample_rate: int = DEFAULT_INPUT_SAMPLE_RATE, batch_size: int = 32,
               params: Optional[Mapping[str, np.ndarray]] = None):
    """Loads the weights.

    Args:
      model: 'MTT_musicnn' (MagnaTagATune tags: instruments, genres, moods) or 'MSD_musicnn'.
      feature: the embedding `embed` returns: 'penultimate' (200-d, the default for FAD),
        'max_pool' or 'mean_pool' (753-d).
      input_sample_rate: the sample rate of the clips given to embed/tags.
      batch_size: patches per forward call (padded, so one compilation serves all calls).
      params: weights to use instead of the checkpoint's (load_params layout).
    """
    if model not in MODELS:
      raise ValueError(f'model={model!r}; the port covers {MODELS}')
    if feature not in FEATURES:
      raise ValueError(f'feature={feature!r}; expected one of {FEATURES}')
    if batch_size < 1:
      raise ValueError(f'batch_size={batch_size} must be positive')
    self.model = model
    self.feature = feature
    self.input_sample_rate = int(input_sample_rate)
    self.batch_size = int(batch_size)
    self.tag_names = TAGS[model]
    self.params = jax.tree.map(jnp.asarray, dict(params if params is not None
                                                 else load_params(model)))
    self._forward = jax.jit(forward)

  @property
  def embedding_dim(self) -> int:
    return FEATURE_DIMS[self.feature]

  def patch_outputs(self, patches: np.ndarray) -> dict[str, np.ndarray]:
    """forward() on [n, 187, 96] patches in fixed-size batches; numpy outputs."""
    patches = np.asarray(patches, np.float32)
    outputs = []
    for start in range(0, patches.shape[0], self.batch_size):
      batch = patches[start:start + self.batch_size]
      count = batch.shape[0]
      if count < self.batch_size:
        batch = np.concatenate([batch, np.zeros((self.batch_size - count,) + batch.shape[1:],
                                                np.float32)])
      result = self._forward(self.params, batch)
      outputs.append({k: np.asarray(v)[:count] for k, v in result.items()})
    if not outputs:
      raise ValueError('no patches')
    return {k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]}

  def clip_outputs(self, wavs: Audio) -> ClipOutputs:
    """Embeddings and tag probabilities of clips in one pass (see embed and tags)."""
    if isinstance(wavs, np.ndarray) and wavs.ndim == 1:
      raise ValueError('expected a batch of clips ([n, samples] or a list of 1-D arrays), got one '
                       '1-D signal: wrap it in a list')
    clip_patches = [audio_patches(w, self.input_sample_rate, name=f'clip {i}')
                    for i, w in enumerate(wavs)]
    if not clip_patches:
      raise ValueError('no clips')
    counts = np.array([p.shape[0] for p in clip_patches])
    out = self.patch_outputs(np.concatenate(clip_patches))
    bounds = np.concatenate([[0], np.cumsum(counts)])

    def clip_means(values):
      return np.stack([values[a:b].mean(axis=0) for a, b in zip(bounds[:-1], bounds[1:])])

    return ClipOutputs(embeddings=clip_means(out[self.feature]), tags=clip_means(out['tags']),
                       num_patches=counts)

  def embed(self, wavs: Audio) -> np.ndarray:
    """[num_clips, d] embeddings (the `feature` layer averaged over each clip's patches).

    Args:
      wavs: clips at input_sample_rate: an [n, samples] array or a list of 1-D arrays (float in
        [-1, 1] or integer PCM), each at least about 3 s long.
    """
    return self.clip_outputs(wavs).embeddings

  def tags(self, wavs: Audio) -> np.ndarray:
    """[num_clips, num_tags] tag probabilities (mean over patches); names in tag_names."""
    return self.clip_outputs(wavs).tags

  def top_tags(self, wavs: Audio, k: int = 3) -> list[list[tuple[str, float]]]:
    """The k most probable tags of each clip, as (name, probability)."""
    probs = self.tags(wavs)
    return [[(self.tag_names[j], float(p[j])) for j in np.argsort(-p)[:k]] for p in probs]


@functools.lru_cache(maxsize=4)
def default_embedder(model: str = 'MTT_musicnn', feature: str = 'penultimate',
                     input_sample_rate: int = DEFAULT_INPUT_SAMPLE_RATE) -> MusicnnEmbedder:
  """A shared MusicnnEmbedder (weights loaded and compiled once per process)."""
  return MusicnnEmbedder(model=model, feature=feature, input_sample_rate=input_sample_rate)

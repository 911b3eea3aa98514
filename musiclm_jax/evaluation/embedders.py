"""FAD embedders beside musicnn: the project's MuLan audio tower, and VGGish / TRILL SavedModels.

Every embedder has musicnn's interface (musicnn.MusicnnEmbedder.clip_outputs):

  outputs = embedder.clip_outputs(wavs)   # wavs: a list of 1-D 24 kHz clips, or [n, samples]
  outputs.embeddings                      # [n, d], one per clip: the mean over its frames
  outputs.tags                            # [n, tags] posteriors, or None (no classifier: no KLD)
  outputs.num_frames                      # [n] frames (windows) averaged per clip

`MulanAudioEmbedder` wraps a `MuLanConditioner` (musiclm_jax/mulan/conditioning.py): the
pipeline folder's `mulan_conditioner` part holds the MuLan network with its audio tower (a copy
of the trained run's, e.g. runs/mulan_tiny, made by `fit_conditioner`), and
`MuLanConditioner.embed_audio` is what MCC (mulan/metrics.py) embeds audio with: 10 s windows
every 1 s, averaged and L2-normalised. The embeddings are unit vectors.

`SavedModelEmbedder` runs a TensorFlow SavedModel on CPU (TensorFlow is kept off the
accelerators, which JAX owns, and quiet); the clips are resampled 24 kHz -> 16 kHz first
(musiclm_jax/audio/io.resample, soxr). The two the MusicLM paper reports FAD with:

  VGGish  TF Hub handle google/vggish/1 (https://tfhub.dev/google/vggish/1; also on Kaggle
          Models as google/vggish, https://www.kaggle.com/models/google/vggish, TensorFlow 2
          variation). Input: a 1-D float32 16 kHz waveform in [-1, 1]; output [frames, 128],
          one frame per 0.96 s. `vggish_embedder(saved_model_dir)`.
  TRILL   TF Hub handle google/nonsemantic-speech-benchmark/trill/3
          (https://tfhub.dev/google/nonsemantic-speech-benchmark/trill/3; tfhub.dev now serves
          its models from Kaggle Models). Input `samples` [batch, samples] float32 at 16 kHz
          and `sample_rate`; output {'embedding': [batch, frames, 512], ...}.
          `trill_embedder(saved_model_dir)`.

Neither is downloaded here (the project runs offline): fetch the model once (the model page's
download gives a .tar.gz), unpack it into a local folder holding saved_model.pb and variables/,
and pass that folder
(`vggish_embedder.saved_model_dir = '/path/to/vggish'` in gin). A SavedModel is a TensorFlow
graph: nothing is unpickled, but load only models from a source you trust.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Optional, Sequence, Union

import gin
import numpy as np

from musiclm_jax.common.tf_setup import quiet_tensorflow

INPUT_SAMPLE_RATE = 24000
MODEL_SAMPLE_RATE = 16000

VGGISH_WEIGHTS = (
    'download VGGish (TF Hub google/vggish/1: https://tfhub.dev/google/vggish/1, or Kaggle '
    'Models google/vggish: https://www.kaggle.com/models/google/vggish, TensorFlow 2 '
    'variation) and unpack its .tar.gz into that folder (saved_model.pb and variables/)')
TRILL_WEIGHTS = (
    'download TRILL (TF Hub google/nonsemantic-speech-benchmark/trill/3: '
    'https://tfhub.dev/google/nonsemantic-speech-benchmark/trill/3, served from Kaggle Models) '
    'and unpack its .tar.gz into that folder (saved_model.pb and variables/)')
# VGGish frames are 0.96 s of 16 kHz audio; shorter clips give no frame.
VGGISH_MIN_SAMPLES = 15360

Audio = Union[np.ndarray, Sequence[np.ndarray]]


class EmbedderError(ValueError):
  """An embedder that cannot be built (a missing or malformed model) or used on these clips."""


@dataclasses.dataclass(frozen=True)
class EmbedderOutputs:
  """Clip-level outputs of an embedder (the interface of musicnn.ClipOutputs).

  Attributes:
    embeddings: float [num_clips, d] each clip's frame embeddings averaged (for MuLan: the
      windows' mean, L2-normalised).
    tags: [num_clips, num_tags] tag posteriors, or None when the embedder has no classifier
      (then the pipeline evaluation scores no KLD with it).
    num_frames: int [num_clips] frames (windows) averaged per clip.
  """
  embeddings: np.ndarray
  tags: Optional[np.ndarray]
  num_frames: np.ndarray


def _clips(wavs: Audio, name: str) -> list[np.ndarray]:
  """The clips as float32 mono 1-D arrays (musicnn.to_float_mono's rules); at least one."""
  from musiclm_jax.evaluation.musicnn import to_float_mono  # pylint: disable=g-import-not-at-top
  if isinstance(wavs, np.ndarray) and wavs.ndim == 1:
    raise ValueError(f'{name}: expected a batch of clips ([n, samples] or a list of 1-D arrays), '
                     'got one 1-D signal: wrap it in a list')
  clips = [to_float_mono(w, f'{name}: clip {i}') for i, w in enumerate(wavs)]
  if not clips:
    raise ValueError(f'{name}: no clips')
  return clips


# ---------------------------------------------------------------------------------------------
# MuLan.


class MulanAudioEmbedder:
  """The MuLan audio tower's clip embeddings (unit vectors), as MCC embeds audio.

  embedder = MulanAudioEmbedder(pipeline.mulan)          # the pipeline's conditioner
  embedder = MulanAudioEmbedder.from_conditioner_dir('runs/mulan_conditioner_tiny')
  emb = embedder.clip_outputs(wavs).embeddings           # [n, embed_dim]
  """
  name = 'mulan'
  model = 'MuLan'
  feature = 'audio embedding'

  def __init__(self, conditioner: Any, batch_size: int = 8,
               input_sample_rate: int = INPUT_SAMPLE_RATE):
    """Wraps a conditioner.

    Args:
      conditioner: a `MuLanConditioner` (or anything with its `embed_audio([batch, samples])`,
        `window_samples` and `hop_samples`).
      batch_size: clips per `embed_audio` call; the last batch of each clip length is padded
        to it, so each length compiles once.
      input_sample_rate: the clips' rate; resampled to MuLan's 24 kHz when it differs.
    """
    if batch_size < 1:
      raise ValueError(f'batch_size={batch_size} must be positive')
    self.conditioner = conditioner
    self.batch_size = int(batch_size)
    self.input_sample_rate = int(input_sample_rate)

  @classmethod
  def from_conditioner_dir(cls, conditioner_dir: str, **kwargs) -> 'MulanAudioEmbedder':
    """The embedder of a `musiclm-jax fit_conditioner` folder (a pipeline's mulan_conditioner/).
    """
    from musiclm_jax.mulan.conditioning import load_conditioner  # pylint: disable=g-import-not-at-top
    if not os.path.isdir(conditioner_dir):
      raise EmbedderError(f'MuLan conditioner folder {conditioner_dir!r} does not exist (fit one '
                          'from a MuLan run with `musiclm-jax fit_conditioner`, or use a pipeline '
                          "folder's mulan_conditioner/)")
    return cls(load_conditioner(conditioner_dir), **kwargs)

  @property
  def embedding_dim(self) -> int:
    return int(self.conditioner.network.embed_dim)

  def _windows(self, samples: int) -> int:
    """Windows `embed_audio` averages for a clip of `samples` (losses.window_embeddings' mask)."""
    window, hop = int(self.conditioner.window_samples), int(self.conditioner.hop_samples)
    return 1 + max(0, (samples - window) // hop)

  def clip_outputs(self, wavs: Audio) -> EmbedderOutputs:
    """Unit [n, embed_dim] embeddings; no tags (MuLan has no tag classifier)."""
    from musiclm_jax.mulan.conditioning import SAMPLE_RATE  # pylint: disable=g-import-not-at-top
    clips = _clips(wavs, 'MulanAudioEmbedder')
    if self.input_sample_rate != SAMPLE_RATE:
      from musiclm_jax.audio.io import resample  # pylint: disable=g-import-not-at-top
      clips = [resample(c, self.input_sample_rate, SAMPLE_RATE) for c in clips]
    out: list[Optional[np.ndarray]] = [None] * len(clips)
    by_length: dict[int, list[int]] = {}
    for i, clip in enumerate(clips):
      by_length.setdefault(clip.shape[0], []).append(i)
    for indices in by_length.values():
      for start in range(0, len(indices), self.batch_size):
        chunk = indices[start:start + self.batch_size]
        padded = chunk + [chunk[-1]] * (self.batch_size - len(chunk))
        emb = np.asarray(self.conditioner.embed_audio(np.stack([clips[i] for i in padded])))
        for row, i in enumerate(chunk):
          out[i] = emb[row]
    return EmbedderOutputs(embeddings=np.stack(out).astype(np.float32), tags=None,
                           num_frames=np.array([self._windows(c.shape[0]) for c in clips]))


# ---------------------------------------------------------------------------------------------
# TensorFlow SavedModels.


def _check_saved_model_dir(saved_model_dir: Optional[str], what: str, weights: str) -> str:
  """The absolute SavedModel folder, or an EmbedderError naming it and where to get one."""
  if saved_model_dir is None or not os.fspath(saved_model_dir).strip():
    raise EmbedderError(f'{what}: no SavedModel folder given (saved_model_dir); {weights}')
  path = os.path.abspath(os.path.expanduser(os.fspath(saved_model_dir)))
  if not os.path.isdir(path):
    raise EmbedderError(f'{what}: SavedModel folder {path} does not exist; {weights}')
  if not any(os.path.isfile(os.path.join(path, f)) for f in ('saved_model.pb',
                                                             'saved_model.pbtxt')):
    raise EmbedderError(f'{what}: {path} has no saved_model.pb, so it is not a TensorFlow '
                        f'SavedModel folder (a downloaded .tar.gz must be unpacked); {weights}')
  return path


class SavedModelEmbedder:
  """Frame embeddings of a TensorFlow SavedModel (VGGish, TRILL), averaged over each clip.

  embedder = vggish_embedder('/models/vggish')
  emb = embedder.clip_outputs(wavs).embeddings   # [n, 128]

  Each clip is resampled to `model_sample_rate` and run alone (clips may differ in length).
  """

  def __init__(self, saved_model_dir: Optional[str], *, name: str,
               model_sample_rate: int = MODEL_SAMPLE_RATE,
               input_sample_rate: int = INPUT_SAMPLE_RATE,
               samples_argument: Optional[str] = None,
               sample_rate_argument: Optional[str] = None,
               batch_axis: bool = False,
               output_key: Optional[str] = None,
               min_samples: int = 1,
               weights: str = 'see musiclm_jax/evaluation/embedders.py for where to get it'):
    """Loads the SavedModel (on CPU).

    Args:
      saved_model_dir: the local SavedModel folder (saved_model.pb, variables/).
      name: the embedder's name in reports and errors ('vggish', 'trill').
      model_sample_rate: the rate the model expects.
      input_sample_rate: the clips' rate.
      samples_argument: the keyword the waveform is passed as (None: positionally).
      sample_rate_argument: a keyword that takes `model_sample_rate`, when the model has one.
      batch_axis: the model takes [1, samples] (not [samples]) and returns [1, frames, d].
      output_key: the entry of a dict output that holds the [frames, d] embeddings.
      min_samples: the fewest model-rate samples that give a frame (for the error message).
      weights: where to download the model (in error messages).

    Raises:
      EmbedderError: the folder is not given, missing, not a SavedModel, or does not load into
        a callable model; the message names the folder and where to get the weights.
    """
    self.name = name
    self.model = name
    self.feature = 'embedding'
    self.model_sample_rate = int(model_sample_rate)
    self.input_sample_rate = int(input_sample_rate)
    self.samples_argument = samples_argument
    self.sample_rate_argument = sample_rate_argument
    self.batch_axis = bool(batch_axis)
    self.output_key = output_key
    self.min_samples = int(min_samples)
    self.saved_model_dir = _check_saved_model_dir(saved_model_dir, name, weights)
    tf = quiet_tensorflow()  # CPU only: JAX owns the accelerators
    self._tf = tf
    try:
      with tf.device('/CPU:0'):
        self._model = tf.saved_model.load(self.saved_model_dir)
    except Exception as e:  # pylint: disable=broad-except
      first = (str(e).strip().splitlines() or [type(e).__name__])[0]
      raise EmbedderError(f'{name}: TensorFlow cannot load {self.saved_model_dir} as a '
                          f'SavedModel ({first}); {weights}') from e
    if not callable(self._model):
      raise EmbedderError(f'{name}: the SavedModel in {self.saved_model_dir} is not callable (no '
                          f'__call__ signature): not the expected model; {weights}')

  def frame_embeddings(self, wav: np.ndarray, clip: str = 'clip') -> np.ndarray:
    """float32 [frames, d] of one 1-D clip at `input_sample_rate` (resampled here)."""
    from musiclm_jax.audio.io import resample  # pylint: disable=g-import-not-at-top
    x = resample(np.asarray(wav, np.float32), self.input_sample_rate, self.model_sample_rate)
    tf = self._tf
    with tf.device('/CPU:0'):
      samples = tf.constant(x[None] if self.batch_axis else x)
      kwargs = {}
      if self.sample_rate_argument:
        kwargs[self.sample_rate_argument] = self.model_sample_rate
      if self.samples_argument:
        out = self._model(**{self.samples_argument: samples}, **kwargs)
      else:
        out = self._model(samples, **kwargs)
    where = f'{self.name} ({self.saved_model_dir})'
    if self.output_key is not None:
      if not isinstance(out, dict) or self.output_key not in out:
        keys = sorted(out) if isinstance(out, dict) else type(out).__name__
        raise EmbedderError(f'{where}: expected a dict output with {self.output_key!r}, got '
                            f'{keys}')
      out = out[self.output_key]
    emb = np.asarray(out, np.float32)
    if self.batch_axis and emb.ndim == 3 and emb.shape[0] == 1:
      emb = emb[0]
    if emb.ndim != 2:
      raise EmbedderError(f'{where}: expected [frames, d] embeddings, got shape {emb.shape}')
    if not emb.shape[0]:
      raise EmbedderError(f'{where}: {clip} ({x.shape[0] / self.model_sample_rate:.3f} s) gives '
                          f'no frame; it needs at least {self.min_samples} samples at '
                          f'{self.model_sample_rate} Hz')
    return emb

  def clip_outputs(self, wavs: Audio) -> EmbedderOutputs:
    """[n, d] mean frame embeddings; no tags (the embedding models have no tag classifier)."""
    clips = _clips(wavs, self.name)
    frames = [self.frame_embeddings(c, f'clip {i}') for i, c in enumerate(clips)]
    return EmbedderOutputs(embeddings=np.stack([f.mean(axis=0) for f in frames]), tags=None,
                           num_frames=np.array([f.shape[0] for f in frames]))


@gin.configurable
def vggish_embedder(saved_model_dir: Optional[str] = None,
                    input_sample_rate: int = INPUT_SAMPLE_RATE) -> SavedModelEmbedder:
  """VGGish (TF Hub google/vggish/1) from a local SavedModel folder: 128-d, 0.96 s frames."""
  return SavedModelEmbedder(saved_model_dir, name='vggish', input_sample_rate=input_sample_rate,
                            min_samples=VGGISH_MIN_SAMPLES,
                            weights=f'{VGGISH_WEIGHTS}; bind vggish_embedder.saved_model_dir')


@gin.configurable
def trill_embedder(saved_model_dir: Optional[str] = None,
                   input_sample_rate: int = INPUT_SAMPLE_RATE,
                   output_key: str = 'embedding') -> SavedModelEmbedder:
  """TRILL (TF Hub google/nonsemantic-speech-benchmark/trill/3) from a local SavedModel folder.

  Args:
    saved_model_dir: the unpacked model.
    input_sample_rate: the clips' rate (resampled to 16 kHz).
    output_key: 'embedding' (512-d, layer 19, the paper's TRILL) or 'layer19'.
  """
  return SavedModelEmbedder(saved_model_dir, name='trill', input_sample_rate=input_sample_rate,
                            samples_argument='samples', sample_rate_argument='sample_rate',
                            batch_axis=True, output_key=output_key,
                            weights=f'{TRILL_WEIGHTS}; bind trill_embedder.saved_model_dir')


# Names `evaluate_pipeline.fad_embedders` accepts beside 'musicnn' and 'mulan' (which need the
# musicnn weights and the pipeline): a factory taking no arguments (gin binds the folder).
SAVED_MODEL_EMBEDDERS: dict[str, Callable[[], SavedModelEmbedder]] = {
    'vggish': vggish_embedder, 'trill': trill_embedder}

"""The text-to-music pipeline: a checkpoint folder; text, melody, continuation or story -> audio.

MusicLM generates in three stages, each a decoder-only LM over a `StageSpec` layout
(musiclm_jax/stages): text -> MuLan text tokens (+ melody tokens of a hummed tune) -> semantic
tokens (25 Hz) -> coarse SoundStream tokens (levels 1-4, 50 Hz) -> fine tokens (levels 5-12)
-> SoundStream decoder -> 24 kHz audio.

The pipeline folder (`assemble_pipeline` writes it, atomically; `Pipeline.load` reads and checks
it):

  pipeline.json          format, sample rate, the sub-folder of every part, and the sampling
                         defaults of each stage: temperature (the paper's 1.0 / 0.95 / 0.4),
                         top_k, top_p, guidance_scale, window_seconds (the stage's training
                         crop) and stride_seconds (half the window for the semantic and coarse
                         stages, as the paper's 15 s stride over 30 s; the whole window, i.e.
                         non-overlapping chunks, for the fine stage)
  codec/                 the SoundStream (export.save_codec: generator weights and codebooks)
  semantic_tokenizer/    the w2v-BERT + k-means tokenizer (musiclm_jax/semantic/tokenizer.py)
  mulan_conditioner/     MuLan and its RVQ (musiclm_jax/mulan/conditioning.py)
  melody_conditioner/    optional: the melody embedder and its RVQ (musiclm_jax/melody)
  semantic_stage/, coarse_stage/, fine_stage/   the stage LMs (export.save_stage: parameters
                         only, spec and Transformer config)

`Pipeline.load` refuses a folder whose parts disagree, naming the part: a stage's stream whose
codebook size, hop or levels differ from the tokenizer, codec or conditioner that makes those
tokens, a stage conditioning on tokens no earlier stage produces, a melody stream without a
melody conditioner, a window that is not whole frames.

Generation (`Pipeline.generate`; `generate_tokens` also returns every stage's tokens and a
record of its decode windows):
  * Conditioning: the MuLan text tokens of the prompt (text=None: the MuLan stream set to its
    NULL id, i.e. unconditional; a continuation without text: the MuLan audio tokens of the
    given clip); with `melody`, the melody tokens of the tune, looped to the length generated,
    for each semantic window the tokens of the stretch of the tune under that window.
  * Classifier-free guidance on the stages with droppable conditioning (the unconditional
    prompt replaces MuLan and melody tokens by their NULL ids); the fine stage has none.
  * Longer than a stage's window: sliding windows (musiclm_jax/generate/windows.py): each window
    after the first takes the last `window - stride` seconds of its own stream as prefix and
    generates `stride` more, with the earlier stages' tokens of the whole window as conditions.
    Windows that need no prefix (the fine stage's non-overlapping chunks) are decoded together
    as one batch (`decode_chunks`).
  * Story mode: (text, seconds) segments; the MuLan tokens switch at each boundary: a window
    stops at the next boundary, and the units it generates use the MuLan tokens of the segment
    they fall in (the semantic and coarse stages; the fine stage reads no MuLan tokens).
  * Continuation: the clip (its last whole 40 ms units) is tokenized by the semantic tokenizer
    and the codec; its tokens are the already-generated prefix of every stage; the result is
    the `seconds` that follow the clip (decoded with the clip's codes as the codec decoder's
    left context, so the audio continues the codec's rendering of the clip seamlessly).
  * Audio: the SoundStream decoder over the whole code sequence, chunked with left context
    (`soundstream.decode_chunked`: equal to decoding it at once, no seams).
  * Ground truth (diagnostics, musiclm_jax/evaluation/pipeline_eval.py): `semantic_tokens=`
    and / or `coarse_tokens=` (`tokenize_audio` of a real clip) skip the stage that would
    generate them; the later stages condition on the given tokens, so comparing the audio with
    and without them shows which stage loses the quality.

Devices: `Pipeline.load(folder, mesh_shape=...)` (or `partitioner=`, a
musiclm_jax/train/partitioning.py `Partitioner`) samples the stage LMs on a (data, fsdp, model)
device mesh: each stage's parameters are placed sharded by their logical axes (heads, MLP and
vocabulary over 'model', embeddings over 'fsdp', as the trainer shards them) and every decode
splits its rows over the 'batch' rule (data x fsdp), padded with copies of the last row to a
multiple of that size (the padding rows are dropped; each real row keeps its own PRNG key, so
the tokens are those of one device: see musiclm_jax/generate/decoding.py on randomness). The
codec, the semantic tokenizer and the conditioners are small and stay on the default device.

Prompts: str (any Unicode; MuLan's text tokenizer normalises it), at most `MAX_PROMPT_CHARS`
characters (the text tower reads only its first `text_length` tokens, 64 by default: a longer
prompt is refused with a clear error instead of being cut silently); an empty or blank prompt
is an error (pass text=None for unconditional generation).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from musiclm_jax.data.integrity import MANIFEST, check_manifest, check_params
from musiclm_jax.data.model_dir import write_directory_atomically
from musiclm_jax.generate import decoding
from musiclm_jax.generate import export
from musiclm_jax.generate import sampling as sampling_lib
from musiclm_jax.generate.windows import Window, plan_windows
from musiclm_jax.stages.spec import (CODEC_FEATURE, MELODY_FEATURE, MULAN_FEATURE,
                                     SEMANTIC_FEATURE, StageSpec)
from musiclm_jax.train import partitioning

logger = logging.getLogger(__name__)

FORMAT = 'musiclm_jax.pipeline/1'
RECORD = 'pipeline.json'
SAMPLE_RATE = 24000
STAGES = ('semantic', 'coarse', 'fine')
# Sub-folder of each part (pipeline.json records them; these are what assemble_pipeline writes).
PART_DIRS = {
    'codec': 'codec',
    'semantic_tokenizer': 'semantic_tokenizer',
    'mulan_conditioner': 'mulan_conditioner',
    'melody_conditioner': 'melody_conditioner',
    'semantic_stage': 'semantic_stage',
    'coarse_stage': 'coarse_stage',
    'fine_stage': 'fine_stage',
}
OPTIONAL_PARTS = ('melody_conditioner',)
# The paper's sampling temperatures (Agostinelli et al., 2023, section 3.4).
PAPER_TEMPERATURES = {'semantic': 1.0, 'coarse': 0.95, 'fine': 0.4}
# Guidance of the stages with droppable conditioning, when their training dropped it (not the
# paper's, which does not use guidance; MusicGen's value). 1.0 where training never dropped it.
DEFAULT_GUIDANCE_SCALE = 3.0
MAX_PROMPT_CHARS = 1000
MAX_SECONDS = 600.0
MIN_MELODY_SECONDS = 1.0
# Tokens per jitted decode call when a progress bar is shown.
STEPS_PER_CALL = 64

AudioLike = Union[np.ndarray, str, os.PathLike]
StageValues = Union[None, float, int, Mapping[str, float], Sequence[float]]
# 'auto', or (data, fsdp, model) sizes with at most one -1 (partitioning.MESH_AXES).
MeshShape = Union[str, Sequence[int]]
AUTO_MESH = 'auto'


# ---------------------------------------------------------------------------------------------
# Sampling settings.

# The range of each StageSampling setting: (test of the value, what the error says it must be).
# guidance_scale mixes the next-token log-probabilities as scale * cond + (1 - scale) * uncond
# (decoding.py): 0 is unconditional sampling, 1 plain conditional sampling, > 1 guided; a
# negative scale (sampling away from the prompt) is refused. top_k is bounded by int32 (what
# decoding feeds the device); any value past the vocabulary keeps every id, as 0 does.
_SETTING_RULES = {
    'temperature': (lambda v: v >= 0, 'a finite number >= 0 (0 = greedy)'),
    'top_k': (lambda v: 0 <= v < 2**31, 'an int in [0, 2**31) (0 = all ids)'),
    'top_p': (lambda v: 0 < v <= 1, 'a finite number in (0, 1] (1 = all ids)'),
    'guidance_scale': (lambda v: v >= 0, 'a finite number >= 0 (0 = unconditional, 1 = plain '
                       'conditional sampling, > 1 guided)'),
    'window_seconds': (lambda v: v > 0, 'a finite number of seconds > 0'),
    'stride_seconds': (lambda v: v > 0, 'a finite number of seconds > 0'),
}
# The largest seed: jax.random.key keeps a seed's low 32 bits (2**32 gives seed 0's key, -1
# seed 2**32 - 1's) and overflows past 64, so seeds are the ints 0 .. 2**32 - 1, one key each.
MAX_SEED = 2**32 - 1


def check_setting(field: str, value: Any) -> Union[int, float]:
  """`value` of the `StageSampling` field `field` as its type (int top_k, float the others).

  Raises:
    ValueError: one line naming `field`, unless `value` is a number (an int for top_k; not a
      bool or a str) that is finite and in the field's range (`_SETTING_RULES`): NaN and
      infinities are refused.
  """
  in_range, rule = _SETTING_RULES[field]
  kinds = (int, np.integer) if field == 'top_k' else (int, float, np.integer, np.floating)
  number = math.nan
  if isinstance(value, kinds) and not isinstance(value, bool):
    try:
      number = int(value) if field == 'top_k' else float(value)
    except OverflowError:  # an int too large for a float
      number = math.inf
  if not (math.isfinite(number) and in_range(number)):
    raise ValueError(f'{field} must be {rule}, got {value!r}')
  return number


def check_seed(seed: Any, what: str = 'seed') -> int:
  """`seed` as an int, or a one-line ValueError naming `what` unless 0 <= seed <= MAX_SEED."""
  if (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))
      or not 0 <= seed <= MAX_SEED):
    raise ValueError(f'{what} must be an int in [0, 2**32 - 1 = {MAX_SEED}], got {seed!r}')
  return int(seed)


@dataclasses.dataclass(frozen=True)
class StageSampling:
  """How one stage samples (pipeline.json's per-stage defaults; `generate` may override).

  Attributes:
    temperature: softmax temperature (0 = greedy).
    top_k: keep the k most likely ids (0 = all).
    top_p: nucleus mass (1 = all).
    guidance_scale: classifier-free guidance (0 = unconditional, 1 = plain conditional
      sampling, > 1 guided; ignored by stages without droppable conditioning).
    window_seconds: the decode window (the stage's training crop by default).
    stride_seconds: seconds generated per window after the first (<= window_seconds).

  Every value is checked on construction (`check_setting`: a number, finite, in range; NaN
  and infinities refused) and stored as its type (int top_k, float the others), so a bad
  setting fails with a line naming it before anything is computed.
  """
  temperature: float
  window_seconds: float
  stride_seconds: float
  top_k: int = 0
  top_p: float = 1.0
  guidance_scale: float = 1.0

  def __post_init__(self):
    for field in dataclasses.fields(self):
      object.__setattr__(self, field.name, check_setting(field.name, getattr(self, field.name)))
    if self.stride_seconds > self.window_seconds:
      raise ValueError(f'stride_seconds ({self.stride_seconds:g}) must be at most '
                       f'window_seconds ({self.window_seconds:g})')

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, entry: Mapping[str, Any], where: str) -> 'StageSampling':
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(entry) - known)
    if unknown:
      raise ValueError(f'{where}: unknown sampling settings {unknown} (known: {sorted(known)})')
    try:
      return cls(**entry)
    except (TypeError, ValueError) as e:
      raise ValueError(f'{where}: {e}') from e


def _per_stage(value: StageValues, what: str, stages: Sequence[str] = STAGES
               ) -> dict[str, float]:
  """A scalar, {stage: value} or one value per stage as {stage: value} (missing stages left out).
  """
  if value is None:
    return {}
  if isinstance(value, Mapping):
    unknown = sorted(set(value) - set(stages))
    if unknown:
      raise ValueError(f'{what}: unknown stages {unknown} (the stages are {list(stages)})')
    return dict(value)
  if isinstance(value, (int, float, np.integer, np.floating)):
    return {s: value for s in stages}
  if isinstance(value, (str, bytes)):
    raise ValueError(f'{what}: give a number, one per stage {list(stages)} or {{stage: value}}, '
                     f'got {value!r}')
  values = list(value)
  if len(values) != len(stages):
    raise ValueError(f'{what}: give one value per stage {list(stages)}, got {values}')
  return dict(zip(stages, values))


# ---------------------------------------------------------------------------------------------
# Prompts, stories, audio inputs.


def check_prompt(text: Any, what: str = 'prompt') -> str:
  """The prompt if usable; ValueError naming the problem (not a str, empty, too long)."""
  if not isinstance(text, str):
    raise ValueError(f'{what} must be a str, got {type(text).__name__}')
  if not text.strip():
    raise ValueError(f'{what} is empty: describe the music (or pass text=None for '
                     'unconditional generation)')
  if len(text) > MAX_PROMPT_CHARS:
    raise ValueError(f'{what} is {len(text):,} characters long; the limit is '
                     f'{MAX_PROMPT_CHARS:,} (MuLan reads only the first 64 text tokens, about '
                     '40 words: shorten it)')
  return text


def parse_story(story: Union[str, Sequence[tuple[str, float]]]) -> list[tuple[str, float]]:
  """Story segments [(text, seconds)] from a list, or from 'text one:15|text two:15'.

  In the string form segments are separated by '|' and each ends with ':SECONDS' (the last
  colon counts, so a text may contain colons, but not '|').

  Raises:
    ValueError: naming the segment at fault (no seconds, seconds not a positive number, an
      empty or too long text, no segments).
  """
  if isinstance(story, str):
    segments = []
    for i, part in enumerate(story.split('|')):
      text, sep, seconds = part.rpartition(':')
      if not sep:
        raise ValueError(f'story segment {i + 1} {part!r}: expected TEXT:SECONDS')
      try:
        value = float(seconds)
      except ValueError as e:
        raise ValueError(f'story segment {i + 1} {part!r}: {seconds!r} is not a number of '
                         'seconds') from e
      segments.append((text.strip(), value))
  else:
    segments = []
    for i, item in enumerate(story):
      try:
        text, value = item
      except (TypeError, ValueError) as e:
        raise ValueError(f'story segment {i + 1}: expected (text, seconds), got {item!r}') from e
      segments.append((text, value))
  if not segments:
    raise ValueError('the story has no segments')
  out = []
  for i, (text, value) in enumerate(segments):
    check_prompt(text, f'story segment {i + 1} text')
    if not isinstance(value, (int, float, np.integer, np.floating)) or not (
        math.isfinite(value) and value > 0):
      raise ValueError(f'story segment {i + 1} ({text!r}): seconds must be a positive number, '
                       f'got {value!r}')
    out.append((text, float(value)))
  return out


def read_audio_input(audio: AudioLike, what: str) -> np.ndarray:
  """float32 mono 24 kHz samples of a path or an array ([samples] or [1, samples]).

  Raises:
    ValueError: a file that cannot be read (the message names it and why), an array that is
      not one clip of finite samples.
  """
  if isinstance(audio, (str, os.PathLike)):
    from musiclm_jax.audio.io import AudioError, load_audio  # pylint: disable=g-import-not-at-top
    try:
      return load_audio(audio, SAMPLE_RATE)
    except AudioError as e:
      raise ValueError(f'{what} file {os.fspath(audio)} cannot be used: {e.reason}'
                       + (f' ({e.detail})' if e.detail else '')) from e
  wav = np.asarray(audio, np.float32)
  if wav.ndim == 2 and wav.shape[0] == 1:
    wav = wav[0]
  if wav.ndim != 1 or wav.size == 0:
    raise ValueError(f'{what} must be 24 kHz mono samples [samples] (or a file path), got an '
                     f'array of shape {wav.shape}')
  if not np.all(np.isfinite(wav)):
    raise ValueError(f'{what} has NaN or Inf samples')
  return wav


# ---------------------------------------------------------------------------------------------
# The results.


@dataclasses.dataclass
class WindowRecord:
  """One decode call: which stage, which window, its prompt (for inspection and tests).

  Attributes:
    stage: 'semantic', 'coarse' or 'fine'.
    window: the window in the stage's units (windows.Window).
    unit_samples: audio samples per unit of this stage.
    prompt: int32 [batch, P] the decoded prompt (BOS, conditions, predicted-stream prefix).
    steps: tokens generated.
    batched: decoded together with other prefix-free windows (decode_chunks).
  """
  stage: str
  window: Window
  unit_samples: int
  prompt: np.ndarray
  steps: int
  batched: bool = False

  def seconds(self) -> tuple[float, float]:
    """(start, stop) of the generated stretch in seconds from the start of the tokens."""
    return (self.window.prefix_end * self.unit_samples / SAMPLE_RATE,
            self.window.stop * self.unit_samples / SAMPLE_RATE)


@dataclasses.dataclass
class Generation:
  """What `Pipeline.generate_tokens` returns.

  Attributes:
    audio: float32 [batch, samples] at 24 kHz: the generated audio only (a continuation's clip
      is not repeated).
    semantic_tokens: int32 [batch, frames] (a continuation's tokens first).
    codec_tokens: int32 [batch, frames, levels] (coarse then fine levels).
    prompt_frames: {'semantic_tokens': frames, 'codec_tokens': frames} given by the
      continuation clip (0 without one).
    windows: every decode call, in order.
    boundaries_seconds: story boundaries, seconds from the start of the generated audio.
    sample_rate: 24000.
    timings: {'semantic' | 'coarse' | 'fine' | 'codec_decode': wall seconds} of this call
      (compilation included on a first call with new shapes; 0 for a stage given as ground
      truth).
    tokens: {stage: tokens generated, summed over the batch rows}.
    ground_truth: the stages whose tokens were given (`semantic_tokens=` / `coarse_tokens=`
      of `generate_tokens`) instead of generated.
  """
  audio: np.ndarray
  semantic_tokens: np.ndarray
  codec_tokens: np.ndarray
  prompt_frames: dict[str, int]
  windows: list[WindowRecord]
  boundaries_seconds: list[float]
  sample_rate: int = SAMPLE_RATE
  timings: dict[str, float] = dataclasses.field(default_factory=dict)
  tokens: dict[str, int] = dataclasses.field(default_factory=dict)
  ground_truth: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------------
# Checking a folder.


class PipelineError(ValueError):
  """A pipeline folder that is incomplete or whose parts do not fit together."""


@dataclasses.dataclass(frozen=True)
class _PartSizes:
  """What the frozen parts produce, read from their records (no weights loaded)."""
  codec_levels: int
  codec_codes: int
  codec_hop: int
  sample_rate: int
  semantic_codes: int
  semantic_hop: int
  mulan_levels: int
  mulan_codes: int
  melody_levels: Optional[int] = None
  melody_codes: Optional[int] = None


def _read_json(path: str, what: str) -> dict[str, Any]:
  if not os.path.isfile(path):
    raise PipelineError(f'{path}: missing; {what}')
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise PipelineError(f'{path}: unreadable ({e})') from e


def read_pipeline_record(folder: str) -> dict[str, Any]:
  """pipeline.json of a pipeline folder (format checked)."""
  record = _read_json(os.path.join(folder, RECORD),
                      'not a pipeline folder (make one with assemble_pipeline)')
  if record.get('format') != FORMAT:
    raise PipelineError(f'{os.path.join(folder, RECORD)}: format {record.get("format")!r}, '
                        f'expected {FORMAT!r}')
  return record


def _part_path(folder: str, record: Mapping[str, Any], part: str) -> Optional[str]:
  name = record.get('parts', {}).get(part)
  if name is None:
    if part in OPTIONAL_PARTS:
      return None
    raise PipelineError(f'{folder}/{RECORD} names no {part} folder')
  if os.path.basename(name) != name or name in ('', '.', '..'):
    raise PipelineError(f'{folder}/{RECORD}: the {part} folder {name!r} must be a plain name '
                        'inside the pipeline folder')
  path = os.path.join(folder, name)
  if not os.path.isdir(path):
    raise PipelineError(f'{folder}: the {part.replace("_", " ")} folder {name}/ is missing')
  return path


def _record_or_error(load: Callable[[str], dict[str, Any]], path: str, part: str
                     ) -> dict[str, Any]:
  try:
    return load(path)
  except (FileNotFoundError, ValueError) as e:
    raise PipelineError(f'the {part.replace("_", " ")} ({path}): {e}') from e


def _part_sizes(folder: str, record: Mapping[str, Any]) -> tuple[_PartSizes, dict[str, Any]]:
  """Sizes of the frozen parts and the stage records, from their JSON records only."""
  from musiclm_jax.melody.conditioning import read_melody_conditioner_record  # pylint: disable=g-import-not-at-top
  from musiclm_jax.mulan.conditioning import read_conditioner_record  # pylint: disable=g-import-not-at-top
  from musiclm_jax.semantic.tokenizer import encoder_from_config, read_tokenizer_record  # pylint: disable=g-import-not-at-top
  codec = _record_or_error(export.read_codec_record, _part_path(folder, record, 'codec'),
                           'codec')
  tok_path = _part_path(folder, record, 'semantic_tokenizer')
  tokenizer = _record_or_error(read_tokenizer_record, tok_path, 'semantic_tokenizer')
  mulan = _record_or_error(read_conditioner_record,
                           _part_path(folder, record, 'mulan_conditioner'), 'mulan_conditioner')
  melody_path = _part_path(folder, record, 'melody_conditioner')
  melody = (None if melody_path is None else _record_or_error(
      read_melody_conditioner_record, melody_path, 'melody_conditioner'))
  try:
    semantic_hop = encoder_from_config(tokenizer['encoder']).hop_samples
  except (KeyError, TypeError, ValueError) as e:
    raise PipelineError(f'the semantic tokenizer ({tok_path}): unreadable encoder config ({e})'
                        ) from e
  sizes = _PartSizes(
      codec_levels=int(codec['num_levels']), codec_codes=int(codec['codebook_size']),
      codec_hop=int(codec['hop_length']), sample_rate=int(codec['sample_rate']),
      semantic_codes=int(tokenizer['num_clusters']), semantic_hop=int(semantic_hop),
      mulan_levels=int(mulan['num_levels']), mulan_codes=int(mulan['codebook_size']),
      melody_levels=None if melody is None else int(melody['num_levels']),
      melody_codes=None if melody is None else int(melody['codebook_size']))
  stages = {}
  for stage in STAGES:
    part = f'{stage}_stage'
    stages[stage] = _record_or_error(export.read_stage_record,
                                     _part_path(folder, record, part), part)
  return sizes, stages


def check_parts(sizes: _PartSizes, specs: Mapping[str, StageSpec], folder: str = '') -> None:
  """Raises PipelineError unless the stages' token streams fit the frozen parts and each other.

  Every stream is checked against the model that makes its tokens (semantic tokens: the
  semantic tokenizer; codec tokens: the SoundStream; MuLan / melody tokens: the conditioners):
  codebook size, levels, hop, sample rate. A time-aligned condition must be produced by an
  earlier stage, no codec level twice, and the codec levels produced must start at level 1.
  """
  where = f'pipeline {folder}: ' if folder else ''
  produced: dict[str, set[int]] = {}
  for stage in STAGES:
    spec = specs[stage]
    if spec.sample_rate != sizes.sample_rate:
      raise PipelineError(f'{where}the {stage} stage works at {spec.sample_rate} Hz, the codec '
                          f'at {sizes.sample_rate} Hz')
    for s in spec.streams:
      name = f'{where}the {stage} stage\'s stream {s.name!r} ({s.feature})'
      levels = range(s.first_level, s.first_level + s.num_levels)
      if s.feature == SEMANTIC_FEATURE:
        expected = dict(codebook_size=sizes.semantic_codes, hop_samples=sizes.semantic_hop)
        maker = 'the semantic tokenizer'
        if s.num_levels != 1 or s.first_level:
          raise PipelineError(f'{name}: semantic tokens have one level, the stream reads '
                              f'levels {list(levels)}')
      elif s.feature == CODEC_FEATURE:
        expected = dict(codebook_size=sizes.codec_codes, hop_samples=sizes.codec_hop)
        maker = 'the codec'
        if levels.stop > sizes.codec_levels:
          raise PipelineError(f'{name}: reads codec levels {levels.start + 1}..{levels.stop}, '
                              f'but the codec has {sizes.codec_levels}')
      elif s.feature == MULAN_FEATURE:
        expected = dict(codebook_size=sizes.mulan_codes, num_levels=sizes.mulan_levels,
                        frames=1)
        maker = 'the MuLan conditioner'
      elif s.feature == MELODY_FEATURE:
        if sizes.melody_levels is None:
          raise PipelineError(f'{name}: the stage conditions on melody tokens, but the pipeline '
                              'has no melody conditioner (assemble it with '
                              'melody_conditioner_dir)')
        expected = dict(codebook_size=sizes.melody_codes, num_levels=sizes.melody_levels)
        maker = 'the melody conditioner'
      else:
        raise PipelineError(f'{name}: no part of the pipeline makes {s.feature!r} tokens')
      for field, value in expected.items():
        if getattr(s, field) != value:
          raise PipelineError(f'{name}: {field} {getattr(s, field)}, but {maker} has {value} '
                              '(the stage was trained on tokens of other models)')
      if s is not spec.target and s.time_aligned:
        missing = set(levels) - produced.get(s.feature, set())
        if missing:
          raise PipelineError(f'{name}: the stage conditions on {s.feature} levels '
                              f'{sorted(l + 1 for l in missing)}, which no earlier stage '
                              'generates')
    target = spec.target
    levels = set(range(target.first_level, target.first_level + target.num_levels))
    if levels & produced.get(target.feature, set()):
      raise PipelineError(f'{where}the {stage} stage generates {target.feature} levels an '
                          'earlier stage generates already')
    produced.setdefault(target.feature, set()).update(levels)
  if SEMANTIC_FEATURE not in produced:
    raise PipelineError(f'{where}no stage generates semantic tokens')
  codec_levels = produced.get(CODEC_FEATURE, set())
  if not codec_levels or codec_levels != set(range(len(codec_levels))):
    raise PipelineError(f'{where}the stages generate codec levels '
                        f'{sorted(l + 1 for l in codec_levels)}; they must be 1..n')


def _default_sampling(stage: str, spec: StageSpec, record: Mapping[str, Any]) -> StageSampling:
  window = float(record['crop_seconds'])
  unit = spec.crop_unit_samples
  window_units = spec.crop_samples(window) // unit
  stride_units = window_units if stage == 'fine' else max(1, window_units // 2)
  guided = bool(spec.droppable) and float(record.get('conditioning_dropout', 0.0)) > 0
  return StageSampling(temperature=PAPER_TEMPERATURES[stage], window_seconds=window,
                       stride_seconds=stride_units * unit / spec.sample_rate,
                       guidance_scale=DEFAULT_GUIDANCE_SCALE if guided else 1.0)


def _sampling_from_record(record: Mapping[str, Any], specs: Mapping[str, StageSpec],
                          where: str) -> dict[str, StageSampling]:
  out = {}
  entries = record.get('sampling', {})
  for stage in STAGES:
    if stage not in entries:
      raise PipelineError(f'{where}: no sampling settings for the {stage} stage')
    sampling = StageSampling.from_json(entries[stage], f'{where} sampling.{stage}')
    spec = specs[stage]
    for field in ('window_seconds', 'stride_seconds'):
      try:
        spec.crop_samples(getattr(sampling, field))
      except ValueError as e:
        raise PipelineError(f'{where} sampling.{stage}.{field}: {e}') from e
    out[stage] = sampling
  return out


# ---------------------------------------------------------------------------------------------
# Assembling a folder.


def _copy_or_export(source: str, target: str, part: str, params_dtype: str) -> str:
  """Copies an exported part into the folder, or exports a training run into it."""
  from musiclm_jax.data.model_dir import VARIABLES  # pylint: disable=g-import-not-at-top
  source = os.fspath(source)
  if not os.path.isdir(source):
    raise FileNotFoundError(f'assemble_pipeline: the {part.replace("_", " ")} {source!r} is not '
                            'a directory')
  records = {'codec': export.CODEC_RECORD, 'semantic_tokenizer': 'tokenizer.json',
             'mulan_conditioner': 'conditioner.json',
             'melody_conditioner': 'melody_conditioner.json'}
  record = records.get(part, export.STAGE_RECORD)
  if os.path.isfile(os.path.join(source, record)):
    if not os.path.isdir(os.path.join(source, VARIABLES)):
      raise FileNotFoundError(f'assemble_pipeline: {source} has {record} but no {VARIABLES}/')
    if part.endswith('_stage') or part == 'codec':
      # An exported part in another dtype is re-saved; otherwise copied as it is.
      saved = _read_json(os.path.join(source, record), '')
      if saved.get('params_dtype', 'float32') != params_dtype:
        return _resave(source, target, part, params_dtype)
    shutil.copytree(source, target)
    return target
  if part in ('codec',) or part.endswith('_stage'):
    if not os.path.isfile(os.path.join(source, 'config.gin')):
      raise FileNotFoundError(f'assemble_pipeline: the {part.replace("_", " ")} {source} is '
                              f'neither an exported part ({record}) nor a training run '
                              '(config.gin + checkpoints/)')
    if part == 'codec':
      return export.export_codec(source, target, params_dtype=params_dtype)
    return export.export_stage(source, target, params_dtype=params_dtype)
  raise FileNotFoundError(f'assemble_pipeline: the {part.replace("_", " ")} {source} has no '
                          f'{record}')


def _resave(source: str, target: str, part: str, params_dtype: str) -> str:
  if part == 'codec':
    generator, variables = export.load_codec_dir(source)
    info = {k: v for k, v in export.read_codec_record(source).items() if k == 'source'}
    return export.save_codec(target, generator, variables, params_dtype=params_dtype,
                             info=info)
  model, params, record = export.load_stage_dir(source)
  info = {k: v for k, v in record.items() if k == 'source'}
  return export.save_stage(target, model, params, crop_seconds=record['crop_seconds'],
                           params_dtype=params_dtype, info=info)


@gin.configurable
def assemble_pipeline(out_dir: str = gin.REQUIRED,
                      codec_dir: str = gin.REQUIRED,
                      semantic_tokenizer_dir: str = gin.REQUIRED,
                      mulan_conditioner_dir: str = gin.REQUIRED,
                      semantic_stage_dir: str = gin.REQUIRED,
                      coarse_stage_dir: str = gin.REQUIRED,
                      fine_stage_dir: str = gin.REQUIRED,
                      melody_conditioner_dir: Optional[str] = None,
                      sampling: Optional[Mapping[str, Mapping[str, float]]] = None,
                      params_dtype: str = 'float32',
                      overwrite: bool = False) -> str:
  """`musiclm-jax assemble_pipeline`: writes a pipeline folder (module docstring), atomically.

  Each part is given as an exported directory (copied) or, for the codec and the stages, as a
  training run directory (exported: parameters only, no optimizer state). The folder is
  written beside `out_dir`, checked (`check_parts`: every stage's streams against the codec,
  tokenizer and conditioners), and only then moved into place; an existing `out_dir` is
  replaced only with `overwrite` (and put back if the replacement fails).

  Args:
    out_dir: the pipeline folder to write.
    codec_dir: a codec run or exported codec directory.
    semantic_tokenizer_dir: a `musiclm-jax fit_kmeans` tokenizer directory.
    mulan_conditioner_dir: a `musiclm-jax fit_conditioner` directory.
    semantic_stage_dir, coarse_stage_dir, fine_stage_dir: stage runs or exported stage dirs.
    melody_conditioner_dir: optional `musiclm-jax fit_melody_conditioner` directory (required
      when the semantic stage conditions on melody tokens).
    sampling: {stage: {setting: value}} overriding the defaults (StageSampling fields: the
      paper's temperatures 1.0 / 0.95 / 0.4, top_k 0, top_p 1, guidance 3 where the stage was
      trained with conditioning dropout, window = the training crop, stride = half of it, the
      fine stage's = the window).
    params_dtype: 'float32' or 'bfloat16' for the exported stage and codec parameters.
    overwrite: replace an existing out_dir.

  Returns:
    The folder's absolute path.
  """
  out_dir = os.path.abspath(os.fspath(out_dir))
  if os.path.exists(out_dir) and not overwrite:
    raise FileExistsError(f'{out_dir} exists; pass overwrite=True to replace it')
  if params_dtype not in export.PARAMS_DTYPES:
    raise ValueError(f'params_dtype must be one of {export.PARAMS_DTYPES}, got {params_dtype!r}')
  sources = {'codec': codec_dir, 'semantic_tokenizer': semantic_tokenizer_dir,
             'mulan_conditioner': mulan_conditioner_dir,
             'melody_conditioner': melody_conditioner_dir,
             'semantic_stage': semantic_stage_dir, 'coarse_stage': coarse_stage_dir,
             'fine_stage': fine_stage_dir}
  overrides = _per_stage_mapping(sampling)

  def write(staging: str) -> None:
    parts = {}
    for part, source in sources.items():
      if source is None:
        continue
      _copy_or_export(source, os.path.join(staging, PART_DIRS[part]), part, params_dtype)
      parts[part] = PART_DIRS[part]
    record = {'format': FORMAT, 'sample_rate': SAMPLE_RATE, 'parts': parts}
    sizes, stage_records = _part_sizes(staging, record)
    specs = {s: export.spec_from_json(stage_records[s]['spec']) for s in STAGES}
    check_parts(sizes, specs, out_dir)
    settings = {}
    for stage in STAGES:
      default = _default_sampling(stage, specs[stage], stage_records[stage]).to_json()
      default.update(overrides.get(stage, {}))
      settings[stage] = StageSampling.from_json(default, f'sampling.{stage}').to_json()
    record.update(
        sampling=settings, max_prompt_chars=MAX_PROMPT_CHARS,
        sources={part: os.path.abspath(os.fspath(s)) for part, s in sources.items() if s},
        params_dtype=params_dtype)
    _sampling_from_record(record, specs, out_dir)  # window and stride are whole frames
    with open(os.path.join(staging, RECORD), 'w', encoding='utf-8') as f:
      json.dump(record, f, indent=2, sort_keys=True)

  write_directory_atomically(out_dir, write, overwrite=overwrite)
  print(f'assemble_pipeline: wrote {out_dir} ({export.describe_dir_size(out_dir) / 1e6:.1f} MB)')
  return out_dir


def _per_stage_mapping(sampling: Optional[Mapping[str, Mapping[str, Any]]]
                       ) -> dict[str, dict[str, Any]]:
  if not sampling:
    return {}
  unknown = sorted(set(sampling) - set(STAGES))
  if unknown:
    raise ValueError(f'sampling: unknown stages {unknown} (the stages are {list(STAGES)})')
  return {k: dict(v) for k, v in sampling.items()}


# ---------------------------------------------------------------------------------------------
# Devices: the mesh the stage LMs sample on.


def parse_mesh_shape(value: Union[None, MeshShape]) -> Optional[MeshShape]:
  """None, 'auto', or the (data, fsdp, model) sizes of '1,-1,1' / a sequence of three ints.

  Raises:
    ValueError: not 'auto' nor three integers (positive, or one -1 for "the other devices").
  """
  if value is None:
    return None
  if isinstance(value, str):
    text = value.strip()
    if text.lower() == AUTO_MESH:
      return AUTO_MESH
    try:
      value = [int(v) for v in text.split(',')]
    except ValueError as e:
      raise ValueError(f'mesh_shape {text!r}: expected {AUTO_MESH!r} or '
                       f'{len(partitioning.MESH_AXES)} comma-separated integers '
                       f'{",".join(partitioning.MESH_AXES)} (e.g. 1,-1,1)') from e
  try:
    shape = tuple(int(v) for v in value)
  except (TypeError, ValueError) as e:
    raise ValueError(f'mesh_shape {value!r}: expected {AUTO_MESH!r} or sizes of the '
                     f'{partitioning.MESH_AXES} axes') from e
  axes = partitioning.MESH_AXES
  if len(shape) != len(axes) or shape.count(-1) > 1 or any(d == 0 or d < -1 for d in shape):
    raise ValueError(f'mesh_shape {shape}: give {len(axes)} sizes {",".join(axes)}, each '
                     'positive or one of them -1 for "the other devices" (or '
                     f'{AUTO_MESH!r})')
  return shape


def abstract_stage_params(model) -> Any:
  """The stage Decoder's params as shapes boxed with their logical axes (nothing computed)."""
  return jax.eval_shape(lambda: model.module.init(jax.random.PRNGKey(0),
                                                  jnp.zeros((1, 2), jnp.int32)))['params']


def _unsplittable(abstract_boxed: Any, rules: partitioning.LogicalRules,
                  mesh_shape: Mapping[str, int]) -> list[str]:
  """The parameters a mesh of these sizes cannot split evenly (by `rules`), one line each."""
  is_spec = lambda x: x is None or isinstance(x, jax.sharding.PartitionSpec)
  logical = nn.get_partition_spec(abstract_boxed)
  mesh_specs = partitioning.logical_to_mesh_specs(logical, rules)
  flat_mesh, _ = jax.tree_util.tree_flatten_with_path(mesh_specs, is_leaf=is_spec)
  flat_logical = jax.tree_util.tree_leaves(logical, is_leaf=is_spec)
  shapes = jax.tree_util.tree_leaves(nn.unbox(abstract_boxed))
  problems = []
  for (path, spec), names, leaf in zip(flat_mesh, flat_logical, shapes):
    for dim, axes in enumerate(spec):
      if axes is None:
        continue
      axes = (axes,) if isinstance(axes, str) else tuple(axes)
      ways = math.prod(mesh_shape[a] for a in axes)
      if leaf.shape[dim] % ways:
        name = '/'.join(str(getattr(k, 'key', k)) for k in path)
        problems.append(f'{name} {tuple(leaf.shape)}: dimension {dim} ({names[dim]!r}, '
                        f'{leaf.shape[dim]}) over {"x".join(axes)} = {ways} devices')
  return problems


def auto_mesh_shape(abstract_params: Sequence[Any], num_devices: Optional[int] = None,
                    rules: Optional[partitioning.LogicalRules] = None) -> tuple[int, int, int]:
  """mesh_shape='auto': the widest tensor parallelism every stage allows, the rest data parallel.

  The 'model' axis takes the largest divisor of the device count that splits every stage's
  model-sharded dimensions (heads, MLP, vocabulary) evenly; the remaining devices split the
  batch (so one sample still uses every device as far as the stages' shapes allow).

  Args:
    abstract_params: each stage's boxed abstract params (`abstract_stage_params`).
    num_devices: default `jax.device_count()`.
    rules: logical axis rules (default `partitioning.standard_logical_axis_rules()`).
  """
  n = jax.device_count() if num_devices is None else int(num_devices)
  rules = partitioning.standard_logical_axis_rules() if rules is None else rules
  for model in sorted((d for d in range(1, n + 1) if n % d == 0), reverse=True):
    sizes = {'data': n // model, 'fsdp': 1, 'model': model}
    if not any(_unsplittable(a, rules, sizes) for a in abstract_params):
      return (n // model, 1, model)
  raise AssertionError('unreachable: a model axis of 1 splits nothing')


# ---------------------------------------------------------------------------------------------
# The pipeline.


@dataclasses.dataclass
class _Stage:
  name: str
  model: Any            # StageModel
  params: Any           # the Decoder's params, on the device
  spec: StageSpec
  vocab_mask: np.ndarray
  record: dict[str, Any]

  @property
  def unit(self) -> int:
    return self.spec.crop_unit_samples

  def units(self, seconds: float) -> int:
    return self.spec.crop_samples(seconds) // self.unit


class Pipeline:
  """A loaded pipeline folder: `generate` text / melody / continuation / story -> 24 kHz audio.

  Use `Pipeline.load(folder)` (or `load_pipeline`). Attributes: `folder`, `record`
  (pipeline.json), `sampling` ({stage: StageSampling}), `stages`, `codec`, `mulan`,
  `melody` (None without a melody conditioner), `partitioner` (None: one device).
  """

  def __init__(self, folder: str, record: dict[str, Any],
               partitioner: Optional[partitioning.Partitioner] = None,
               mesh_shape: Optional[MeshShape] = None, verify: bool = True):
    """Loads and checks every part (see `Pipeline.load`)."""
    from musiclm_jax.data.frozen_tokenizer import _restore_numpy  # pylint: disable=g-import-not-at-top
    from musiclm_jax.data.model_dir import VARIABLES  # pylint: disable=g-import-not-at-top
    from musiclm_jax.melody.conditioning import load_melody_conditioner  # pylint: disable=g-import-not-at-top
    from musiclm_jax.mulan.conditioning import load_conditioner  # pylint: disable=g-import-not-at-top
    from musiclm_jax.semantic.tokenizer import read_tokenizer_record, tokenizer_module  # pylint: disable=g-import-not-at-top
    self.folder = folder
    self.record = record
    if check_manifest(folder, record.get('parts'), verify):
      logger.info('%s: every file matches its %s', folder, MANIFEST)
    sizes, stage_records = _part_sizes(folder, record)
    specs = {}
    for stage in STAGES:
      try:
        specs[stage] = export.spec_from_json(stage_records[stage]['spec'])
      except (KeyError, ValueError) as e:
        raise PipelineError(f'the {stage} stage ({folder}/{stage}_stage): {e}') from e
    check_parts(sizes, specs, folder)
    self.sampling = _sampling_from_record(record, specs, f'{folder}/{RECORD}')
    self._sizes = sizes

    self.codec, variables = export.load_codec_dir(_part_path(folder, record, 'codec'), verify)
    self.codec_variables = jax.device_put(variables)
    tok_dir = _part_path(folder, record, 'semantic_tokenizer')
    self.semantic_tokenizer = tokenizer_module(tok_dir)
    tok_params = _restore_numpy(os.path.join(os.path.abspath(tok_dir), VARIABLES),
                                {'params': 'params'})['params']
    check_params(tok_params, read_tokenizer_record(tok_dir),
                 f'the semantic tokenizer ({tok_dir})', verify)
    self._tokenizer_params = jax.device_put(tok_params)
    tokenizer = self.semantic_tokenizer
    self._tokenize = jax.jit(lambda p, a: tokenizer.apply({'params': p}, a, method='tokenize'))
    self.mulan = load_conditioner(_part_path(folder, record, 'mulan_conditioner'), verify)
    melody_dir = _part_path(folder, record, 'melody_conditioner')
    self.melody = None if melody_dir is None else load_melody_conditioner(melody_dir, verify)
    # The stages' parameter shapes and logical axes (from their records: nothing loaded yet)
    # choose the mesh ('auto') and where each parameter goes.
    abstract = {stage: abstract_stage_params(export.stage_model_from_record(
        stage_records[stage], f'{folder}/{stage}_stage/{export.STAGE_RECORD}'))
                for stage in STAGES}
    self.partitioner = self._make_partitioner(partitioner, mesh_shape, abstract)
    self.stages: dict[str, _Stage] = {}
    for stage in STAGES:  # one stage's host copy of the parameters at a time
      model, params, stage_record = export.load_stage_dir(
          _part_path(folder, record, f'{stage}_stage'), verify)
      params = self._place_params(stage, params, abstract[stage])
      self.stages[stage] = _Stage(stage, model, params, model.spec,
                                  model.spec.vocab_mask(model.config.vocab_size), stage_record)
    self.codec_levels = max(s.spec.target.first_level + s.spec.target.num_levels
                            for s in self.stages.values()
                            if s.spec.target.feature == CODEC_FEATURE)
    # Every stage's time grid is whole units of this many samples (0.04 s for MusicLM's hops).
    self.unit_samples = math.lcm(*[s.unit for s in self.stages.values()])

  @classmethod
  def load(cls, folder: Union[str, os.PathLike],
           partitioner: Optional[partitioning.Partitioner] = None, *,
           mesh_shape: Optional[MeshShape] = None, verify: bool = True) -> 'Pipeline':
    """Loads a pipeline folder, checking that its parts are complete, intact and fit together.

    A pipeline folder is data: its JSON records name only the classes and fields of
    `musiclm_jax.data.module_records.RECORD_CLASSES`, so loading one runs no code it names.
    Every part's weights are checked against its record's params_sha256, and a shipped folder's
    files against its manifest.json (`verify=False` skips both, for weights edited on purpose).

    By default everything runs on the default device. With a mesh (`partitioner` or
    `mesh_shape`), the three stage LMs sample on it (module docstring, "Devices"): their
    parameters are sharded by their logical axes, the rows of every decode split over the
    data-parallel devices (a batch that does not divide them is padded, the padding dropped).
    The codec, semantic tokenizer and MuLan / melody conditioners are small and stay
    unsharded on the default device. For a fixed seed the tokens equal one device's.

    Args:
      folder: the pipeline folder.
      partitioner: a `Partitioner` (its mesh and logical axis rules) to sample on.
      mesh_shape: instead of `partitioner`: sizes of the (data, fsdp, model) mesh axes over
        all devices, one may be -1 for "the rest" (e.g. (-1, 1, 1): data parallel; (1, 1, -1):
        tensor parallel, the heads, MLP and vocabulary split) or as a string '1,1,-1'; or
        'auto' (`auto_mesh_shape`: as much tensor parallelism as every stage's shapes allow,
        the other devices data parallel). The standard logical axis rules apply.
      verify: check the weights and the manifest (above).

    Raises:
      PipelineError (a ValueError): naming the missing or mismatched part, or a stage
        parameter the mesh cannot split evenly.
      IntegrityError (a ValueError): a part's weights or a file differ from its record or the
        manifest (the message names the part).
      RecordError (a ValueError): a record names a class or field a folder may not name.
      ValueError: both `partitioner` and `mesh_shape`, or a malformed `mesh_shape`.
    """
    mesh_shape = parse_mesh_shape(mesh_shape)
    if partitioner is not None and mesh_shape is not None:
      raise ValueError('give a partitioner or a mesh_shape, not both')
    folder = os.path.abspath(os.fspath(folder))
    if not os.path.isdir(folder):
      raise PipelineError(f'{folder}: no such pipeline folder')
    return cls(folder, read_pipeline_record(folder), partitioner, mesh_shape, verify)

  @property
  def sample_rate(self) -> int:
    return SAMPLE_RATE

  @property
  def has_melody(self) -> bool:
    """Whether the semantic stage conditions on melody tokens."""
    return any(s.feature == MELODY_FEATURE for s in self.stages['semantic'].spec.conditions)

  def describe(self) -> str:
    """The stages, their sizes and sampling settings, one line each."""
    lines = [f'pipeline {self.folder}']
    for stage in STAGES:
      s, sampling = self.stages[stage], self.sampling[stage]
      lines.append(f'  {stage:<8} {s.record.get("num_params", 0) / 1e6:.1f}M parameters, '
                   f'vocab {s.model.config.vocab_size}, window {sampling.window_seconds:g} s / '
                   f'stride {sampling.stride_seconds:g} s, temperature '
                   f'{sampling.temperature:g}, top_k {sampling.top_k}, guidance '
                   f'{sampling.guidance_scale:g}')
    lines.append(f'  melody conditioning: {"yes" if self.has_melody else "no"}')
    if self.partitioner is None:
      lines.append(f'  devices: one ({jax.devices()[0].platform})')
    else:
      mesh = ' x '.join(f'{axis} {size}' for axis, size in self.partitioner.mesh_shape.items())
      lines.append(f'  devices: mesh {mesh} (stage LMs sharded; batch split '
                   f'{self.partitioner.data_parallel_size} ways)')
    return '\n'.join(lines)

  # ------------------------------------------------------------------------------ devices
  @staticmethod
  def _make_partitioner(partitioner: Optional[partitioning.Partitioner],
                        mesh_shape: Optional[MeshShape], abstract: Mapping[str, Any]
                        ) -> Optional[partitioning.Partitioner]:
    """The given partitioner, one for `mesh_shape` (standard rules), or None (one device)."""
    if partitioner is not None or mesh_shape is None:
      return partitioner
    if mesh_shape == AUTO_MESH:
      mesh_shape = auto_mesh_shape(list(abstract.values()))
      logger.info('mesh_shape=auto: (data, fsdp, model) = %s', mesh_shape)
    return partitioning.Partitioner(mesh_shape=mesh_shape)

  def _place_params(self, stage: str, params: Any, abstract: Any) -> Any:
    """The stage's params on the device, or sharded over the mesh by their logical axes."""
    if self.partitioner is None:
      return jax.device_put(params)
    problems = _unsplittable(abstract, self.partitioner.rules, self.partitioner.mesh_shape)
    if problems:
      shape = tuple(self.partitioner.mesh_shape.values())
      raise PipelineError(
          f'the {stage} stage cannot be split over the mesh {shape} '
          f'({",".join(self.partitioner.mesh_shape)}): {problems[0]}'
          + (f' (and {len(problems) - 1} more)' if len(problems) > 1 else '')
          + f'; pick sizes that divide it, or mesh_shape={AUTO_MESH!r}')
    shardings = jax.tree_util.tree_map(
        self.partitioner.sharding, self.partitioner.mesh_specs_from_boxed(abstract),
        is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    return jax.device_put(params, shardings)

  def _padded_rows(self, batch: int) -> int:
    """Rows decoded for `batch` rows: a multiple of the data-parallel size under a mesh."""
    if self.partitioner is None:
      return batch
    ways = self.partitioner.data_parallel_size
    return -(-batch // ways) * ways

  # ------------------------------------------------------------------------------ inputs
  def text_tokens(self, texts: Sequence[str]) -> np.ndarray:
    """MuLan text tokens int32 [len(texts), levels] of checked prompts."""
    texts = [check_prompt(t) for t in texts]
    return np.asarray(self.mulan.text_tokens(texts), np.int32)

  def _settings(self, guidance_scale: StageValues, temperatures: StageValues,
                top_k: StageValues) -> dict[str, StageSampling]:
    """The stages' settings with these overrides, each checked (`check_setting`)."""
    settings = dict(self.sampling)
    for name, field, value in (('guidance_scale', 'guidance_scale', guidance_scale),
                               ('temperatures', 'temperature', temperatures),
                               ('top_k', 'top_k', top_k)):
      for stage, v in _per_stage(value, name).items():
        try:
          settings[stage] = dataclasses.replace(settings[stage], **{field: v})
        except ValueError as e:
          raise ValueError(f"{name}: the {stage} stage's {e}") from e
    return settings

  def _melody_tokens_fn(self, melody: Optional[AudioLike]) -> Optional[Callable[[int], Any]]:
    """tokens(start sample) -> int32 [frames, levels] of the looped tune from that sample."""
    if melody is None:
      return None
    if not self.has_melody:
      raise ValueError(f'this pipeline ({self.folder}) cannot follow a melody: its semantic '
                       'stage was trained without melody conditioning')
    wav = read_audio_input(melody, 'melody')
    if len(wav) < MIN_MELODY_SECONDS * SAMPLE_RATE:
      raise ValueError(f'the melody is {len(wav) / SAMPLE_RATE:.2f} s long; give at least '
                       f'{MIN_MELODY_SECONDS:g} s of the tune')
    stream = next(s for s in self.stages['semantic'].spec.conditions
                  if s.feature == MELODY_FEATURE)
    from musiclm_jax.melody import conditioning as melody_conditioning  # pylint: disable=g-import-not-at-top
    network = self.melody.network
    length = melody_conditioning.segment_samples(network.window_samples, network.hop_samples,
                                                 stream.frames)
    cache: dict[int, np.ndarray] = {}

    def tokens(start: int) -> np.ndarray:
      start = int(start) % len(wav)
      if start not in cache:
        segment = melody_conditioning.looped_segment(wav, start, length)
        cache[start] = np.asarray(self.melody.tokens(segment[None])[0], np.int32)
        assert cache[start].shape == (stream.frames, stream.num_levels), cache[start].shape
      return cache[start]

    return tokens

  # ------------------------------------------------------------------------------ generation
  def generate(self, text: Union[None, str, Sequence[str]] = None,
               seconds: Optional[float] = None, **kwargs) -> np.ndarray:
    """Generates audio: float32 [batch, samples] at 24 kHz (see `generate_tokens`)."""
    return self.generate_tokens(text, seconds, **kwargs).audio

  def generate_tokens(self, text: Union[None, str, Sequence[str]] = None,
                      seconds: Optional[float] = None, *,
                      melody: Optional[AudioLike] = None,
                      continuation: Optional[AudioLike] = None,
                      story: Union[None, str, Sequence[tuple[str, float]]] = None,
                      seed: int = 0, num_samples: int = 1,
                      guidance_scale: StageValues = None, temperatures: StageValues = None,
                      top_k: StageValues = None, progress: bool = False,
                      semantic_tokens: Optional[np.ndarray] = None,
                      coarse_tokens: Optional[np.ndarray] = None) -> Generation:
    """Generates every stage's tokens and the audio (module docstring).

    Ground-truth substitution (diagnostics: which stage loses the quality): `semantic_tokens`
    and / or `coarse_tokens` (e.g. `tokenize_audio` of a real clip) replace what the semantic
    and / or coarse stage would generate: that stage is skipped and the later stages condition
    on the given tokens. They cover the `seconds` generated (after a continuation's clip).

    Args:
      text: a prompt, a list of prompts (one row each), or None (unconditional; with a
        continuation: the clip's MuLan audio tokens).
      seconds: seconds to generate (default 10; with a story, its total, which `seconds` must
        then equal if given). With a continuation: the seconds after the clip.
      melody: a hummed / whistled / played tune (24 kHz samples or an audio file) to follow;
        looped to the length generated.
      continuation: audio (samples or a file) to continue.
      story: [(text, seconds), ...] or 'text one:15|text two:15' (then `text` must be None).
      seed: the random seed, an int in [0, MAX_SEED = 2**32 - 1] (same seed, same inputs,
        same audio).
      num_samples: samples per prompt (rows = prompts x num_samples).
      guidance_scale: a value for the stages that condition on MuLan (and melody), or
        {stage: value}; default pipeline.json's. Finite and >= 0 (0 = unconditional, 1 = no
        guidance).
      temperatures: one value, one per stage (semantic, coarse, fine), or {stage: value};
        finite and >= 0 (0 = greedy).
      top_k: likewise; ints >= 0 (0 = all ids).
      progress: show a progress bar per stage (tqdm, on stderr).
      semantic_tokens: int [batch or 1, frames] semantic tokens to use instead of generating
        them (frames = the whole 40 ms units of `seconds` at the semantic tokenizer's rate).
      coarse_tokens: int [batch or 1, frames, levels] codec codes of the coarse stage's levels
        (levels 1..coarse_levels; frames at the codec's rate) to use instead of generating
        them.

    Returns:
      A `Generation` (its `audio`: float32 [batch, samples]).

    Raises:
      ValueError: a bad prompt (empty, too long, not a str), story, length, melody or clip,
        ground-truth tokens of the wrong shape or range, or a sampling setting, seed or
        num_samples that is not a finite number in range (checked before any compute); the
        message says which and why.
    """
    if (isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer))
        or num_samples < 1):
      raise ValueError(f'num_samples must be a positive int, got {num_samples!r}')
    seed = check_seed(seed)
    settings = self._settings(guidance_scale, temperatures, top_k)
    # ---- conditioning plan: texts per segment, seconds, boundaries
    if story is not None:
      if text is not None:
        raise ValueError('give either text or story, not both (each story segment has its '
                         'own text)')
      segments = parse_story(story)
      total_seconds = sum(s for _, s in segments)
      if seconds is not None and abs(float(seconds) - total_seconds) > 1e-6:
        raise ValueError(f'seconds={seconds} but the story lasts {total_seconds:g} s; leave '
                         'seconds out with a story')
      seconds = total_seconds
      prompts = 1
    else:
      segments = None
      if isinstance(text, str):
        text = [text]
      if text is not None:
        if not isinstance(text, (list, tuple)):
          raise ValueError(f'text must be a str, a list of str or None; the prompt must be a '
                           f'str, got {type(text).__name__}')
        text = list(text)
        if not text:
          raise ValueError('text is an empty list: give at least one prompt (or None)')
      prompts = 1 if text is None else len(text)
      seconds = 10.0 if seconds is None else seconds
    if not isinstance(seconds, (int, float, np.integer, np.floating)) or not (
        math.isfinite(seconds) and 0 < seconds <= MAX_SECONDS):
      raise ValueError(f'seconds must be in (0, {MAX_SECONDS:g}], got {seconds!r}')
    batch = prompts * int(num_samples)
    unit = self.unit_samples
    samples = int(round(float(seconds) * SAMPLE_RATE))
    new_units = -(-samples // unit)
    boundary_samples = []
    if segments:
      for i, (words, length) in enumerate(segments):
        if length * SAMPLE_RATE < unit:
          raise ValueError(f'story segment {i + 1} ({words!r}) is shorter than '
                           f'{unit / SAMPLE_RATE:g} s, the time step of the stages')
      elapsed = 0.0
      for i, (_, length) in enumerate(segments[:-1]):
        elapsed += length
        boundary_samples.append(int(round(elapsed * SAMPLE_RATE / unit)) * unit)
      bounds = [0] + boundary_samples + [new_units * unit]
      for i in range(len(segments)):
        if bounds[i + 1] <= bounds[i]:
          raise ValueError(f'story segment {i + 1} ({segments[i][0]!r}) is shorter than '
                           f'{unit / SAMPLE_RATE:g} s, the time step of the stages')

    # ---- MuLan tokens per segment ([batch, levels], or None: NULL)
    clip = None
    if continuation is not None:
      clip = read_audio_input(continuation, 'continuation')
      keep = len(clip) // unit * unit
      if keep == 0:
        raise ValueError(f'the continuation clip is {len(clip) / SAMPLE_RATE:.3f} s long; it '
                         f'needs at least {unit / SAMPLE_RATE:g} s')
      clip = clip[len(clip) - keep:]
    if segments:
      tokens = self.text_tokens([t for t, _ in segments])
      mulan = [np.repeat(tokens[i][None], batch, axis=0) for i in range(len(segments))]
    elif text is not None:
      mulan = [np.repeat(self.text_tokens(text), num_samples, axis=0)]
    elif clip is not None:
      mulan = [np.repeat(np.asarray(self.mulan.audio_tokens(clip), np.int32)[None], batch, 0)]
    else:
      mulan = [None]
    melody_tokens = self._melody_tokens_fn(melody)

    # ---- the token arrays, a continuation's tokens first
    prompt_units = 0 if clip is None else len(clip) // unit
    total_units = prompt_units + new_units
    semantic_hop = self._sizes.semantic_hop
    codec_hop = self._sizes.codec_hop
    streams = {
        SEMANTIC_FEATURE: np.zeros((batch, total_units * unit // semantic_hop, 1), np.int32),
        CODEC_FEATURE: np.zeros((batch, total_units * unit // codec_hop, self.codec_levels),
                                np.int32),
    }
    if clip is not None:
      semantic = np.asarray(self._tokenize(self._tokenizer_params, clip[None]), np.int32)
      codes = np.asarray(self._encode(clip[None]), np.int32)[..., :self.codec_levels]
      streams[SEMANTIC_FEATURE][:, :semantic.shape[1], 0] = semantic[0]
      streams[CODEC_FEATURE][:, :codes.shape[1]] = codes[0]
    given = self._ground_truth({'semantic': semantic_tokens, 'coarse': coarse_tokens},
                               batch=batch, new_units=new_units, seconds=float(seconds))
    for stage, codes in given.items():
      target = self.stages[stage].spec.target
      start = prompt_units * unit // target.hop_samples
      streams[target.feature][:, start:,
                              target.first_level:target.first_level + target.num_levels] = codes

    key = jax.random.key(int(seed))
    boundaries_units = [prompt_units + b // unit for b in boundary_samples]
    records: list[WindowRecord] = []
    timings: dict[str, float] = {}
    for index, stage in enumerate(STAGES):
      if stage in given:
        timings[stage] = 0.0
        continue
      started = time.perf_counter()
      self._run_stage(self.stages[stage], settings[stage], streams, batch=batch,
                      total_units=total_units, prompt_units=prompt_units,
                      boundaries=boundaries_units, mulan=mulan, melody=melody_tokens,
                      rng=jax.random.fold_in(key, index), records=records, progress=progress)
      timings[stage] = time.perf_counter() - started

    # ---- audio: the whole code sequence, with the clip's last frames as left context
    prompt_frames = prompt_units * unit // codec_hop
    context = min(prompt_frames, self.codec.decoder_context_frames)
    started = time.perf_counter()
    audio = self._decode_audio(streams[CODEC_FEATURE][:, prompt_frames - context:], progress)
    timings['codec_decode'] = time.perf_counter() - started
    audio = audio[:, context * codec_hop:context * codec_hop + samples]
    return Generation(
        audio=np.ascontiguousarray(audio, np.float32),
        semantic_tokens=streams[SEMANTIC_FEATURE][..., 0],
        codec_tokens=streams[CODEC_FEATURE],
        prompt_frames={SEMANTIC_FEATURE: prompt_units * unit // semantic_hop,
                       CODEC_FEATURE: prompt_frames},
        windows=records,
        boundaries_seconds=[b / SAMPLE_RATE for b in boundary_samples],
        timings=timings,
        tokens={stage: sum(r.steps * r.prompt.shape[0] for r in records if r.stage == stage)
                for stage in STAGES},
        ground_truth=tuple(given))

  def tokenize_audio(self, audio: Any) -> tuple[np.ndarray, np.ndarray]:
    """The ground-truth tokens of real audio, as the stages would generate them.

    Args:
      audio: float 24 kHz audio [batch, samples] (or [samples]); its whole 40 ms units (the
        stages' common time step, `unit_samples`) from the start are tokenized, the rest
        dropped.

    Returns:
      (semantic_tokens int32 [batch, frames] of the semantic tokenizer, codec_tokens int32
      [batch, frames, codec_levels] of the codec's first `codec_levels` levels): the
      `semantic_tokens=` and (its coarse levels) `coarse_tokens=` of `generate_tokens`.

    Raises:
      ValueError: audio shorter than one unit, not [batch, samples], or not finite.
    """
    wav = np.asarray(audio, np.float32)
    wav = wav[None] if wav.ndim == 1 else wav
    if wav.ndim != 2:
      raise ValueError(f'tokenize_audio: expected audio [batch, samples], got shape {wav.shape}')
    keep = wav.shape[1] // self.unit_samples * self.unit_samples
    if keep == 0:
      raise ValueError(f'tokenize_audio: {wav.shape[1]} samples are shorter than one unit '
                       f'({self.unit_samples} samples, {self.unit_samples / SAMPLE_RATE:g} s)')
    if not np.all(np.isfinite(wav)):
      raise ValueError('tokenize_audio: the audio has NaN or Inf samples')
    wav = wav[:, :keep]
    semantic = np.asarray(self._tokenize(self._tokenizer_params, wav), np.int32)
    codes = np.asarray(self._encode(wav), np.int32)[..., :self.codec_levels]
    return semantic, codes

  def decode_audio(self, codec_tokens: Any) -> np.ndarray:
    """float32 [batch, frames * hop] 24 kHz audio of codec tokens [batch, frames, levels]."""
    codes = np.asarray(codec_tokens, np.int32)
    if codes.ndim != 3 or codes.shape[2] > self._sizes.codec_levels:
      raise ValueError(f'decode_audio: expected codec tokens [batch, frames, levels <= '
                       f'{self._sizes.codec_levels}], got shape {codes.shape}')
    return self._decode_audio(codes, progress=False)

  # ------------------------------------------------------------------------------ internals
  def _ground_truth(self, tokens: Mapping[str, Optional[np.ndarray]], *, batch: int,
                    new_units: int, seconds: float) -> dict[str, np.ndarray]:
    """{stage: int32 codes [batch, frames, levels]} of the given ground-truth tokens, checked.

    Raises:
      ValueError: naming the argument: not integers, the wrong shape for `seconds` and the
        batch, or codes outside the stage's codebook.
    """
    out = {}
    for stage, values in tokens.items():
      if values is None:
        continue
      arg = f'{stage}_tokens'
      target = self.stages[stage].spec.target
      frames = new_units * self.unit_samples // target.hop_samples
      array = np.asarray(values)
      if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f'{arg} must be integer codes, got dtype {array.dtype}')
      if stage == 'semantic' and array.ndim == 2:
        array = array[..., None]
      expected = (f'[batch, {frames}]' if stage == 'semantic'
                  else f'[batch, {frames}, {target.num_levels}]')
      if (array.ndim != 3 or array.shape[1:] != (frames, target.num_levels)
          or array.shape[0] not in (1, batch)):
        raise ValueError(
            f'{arg} must be {expected} with batch {batch} (or 1): {seconds:g} s is {new_units} '
            f'units of {self.unit_samples / SAMPLE_RATE:g} s, {frames} frames at '
            f'{SAMPLE_RATE / target.hop_samples:g} Hz; got shape {np.shape(values)}')
      if array.size and (array.min() < 0 or array.max() >= target.codebook_size):
        raise ValueError(f'{arg} must lie in [0, {target.codebook_size}) (the {stage} '
                         f'stage\'s codebook), got [{array.min()}, {array.max()}]')
      out[stage] = np.broadcast_to(array.astype(np.int32), (batch,) + array.shape[1:])
    return out

  def _encode(self, wav: np.ndarray) -> np.ndarray:
    from musiclm_jax.codec.soundstream import encode_chunked  # pylint: disable=g-import-not-at-top
    return np.asarray(encode_chunked(self.codec, self.codec_variables, wav))

  def _decode_audio(self, codes: np.ndarray, progress: bool) -> np.ndarray:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    from musiclm_jax.codec.soundstream import decode_chunked  # pylint: disable=g-import-not-at-top
    with tqdm(total=codes.shape[1], desc='audio', unit='frame', disable=not progress,
              dynamic_ncols=True) as bar:
      audio = np.asarray(decode_chunked(self.codec, self.codec_variables, codes))
      bar.update(codes.shape[1])
    return audio

  def _conditions(self, stage: _Stage, window: Window, streams: Mapping[str, np.ndarray],
                  mulan: Sequence[Optional[np.ndarray]], melody, batch: int,
                  prompt_units: int) -> np.ndarray:
    """int32 [batch, P]: BOS, the window's conditions, then its predicted-stream prefix."""
    spec, unit = stage.spec, stage.unit
    codes, dropped = {}, []
    for s in spec.conditions:
      if s.time_aligned:
        per_unit = unit // s.hop_samples
        codes[s.name] = streams[s.feature][:, window.start * per_unit:window.end * per_unit,
                                           s.first_level:s.first_level + s.num_levels]
      elif s.feature == MULAN_FEATURE:
        tokens = mulan[window.segment]
        if tokens is None:
          tokens = np.zeros((batch, s.num_levels), np.int32)
          dropped.append(s.name)
        codes[s.name] = tokens
      elif s.feature == MELODY_FEATURE:
        if melody is None:
          tokens = np.zeros((batch, s.frames, s.num_levels), np.int32)
          dropped.append(s.name)
        else:
          # The tune's clock starts with the generated audio (after a continuation's clip).
          start = (window.start * unit - prompt_units * self.unit_samples)
          tokens = np.repeat(melody(start)[None], batch, axis=0)
        codes[s.name] = tokens
      else:
        raise ValueError(f'stage {stage.name!r}: no input for stream {s.name!r} ({s.feature})')
    prompt = np.asarray(spec.flatten_prompt(codes), np.int32)
    if dropped:
      prompt = np.asarray(spec.drop_streams(prompt, {name: True for name in dropped}), np.int32)
    target = spec.target
    per_unit = unit // target.hop_samples
    prefix = streams[target.feature][:, window.start * per_unit:window.prefix_end * per_unit,
                                     target.first_level:target.first_level + target.num_levels]
    prefix = np.asarray(spec.encode_stream(target.name, prefix), np.int32)
    bos = np.zeros((batch, 1), np.int32)
    return np.concatenate([bos, prompt, prefix], axis=1)

  def _run_stage(self, stage: _Stage, sampling: StageSampling, streams: dict[str, np.ndarray],
                 *, batch: int, total_units: int, prompt_units: int, boundaries: Sequence[int],
                 mulan, melody, rng, records: list[WindowRecord], progress: bool) -> None:
    """Generates the stage's predicted stream into `streams` window by window."""
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    spec, unit = stage.spec, stage.unit
    scale = self.unit_samples // unit
    clip_level = any(not s.time_aligned for s in spec.conditions)
    windows = plan_windows(total_units * scale, stage.units(sampling.window_seconds),
                           stage.units(sampling.stride_seconds), start=prompt_units * scale,
                           boundaries=[b * scale for b in boundaries] if clip_level else ())
    target = spec.target
    per_unit = unit // target.hop_samples
    tokens_per_unit = per_unit * target.num_levels
    guided = bool(spec.droppable) and sampling.guidance_scale != 1.0
    kwargs = dict(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                  vocab_mask=stage.vocab_mask, partitioner=self.partitioner)
    if guided:
      kwargs['guidance_scale'] = sampling.guidance_scale
    # Under a mesh the rows are padded to a multiple of the data-parallel size with copies of
    # the last row (dropped afterwards). Each real row keeps the key it has on one device.
    rows = self._padded_rows(batch)

    def pad(values: np.ndarray) -> np.ndarray:
      if rows == batch:
        return values
      return np.concatenate([values, np.repeat(values[-1:], rows - batch, axis=0)], axis=0)

    def row_keys(key):
      keys = sampling_lib.row_keys(key, batch)
      if rows == batch:
        return keys
      return jnp.concatenate([keys] + [keys[-1:]] * (rows - batch))

    def write(window: Window, ids) -> None:
      codes = np.asarray(spec.unflatten_predicted(np.asarray(ids, np.int32)))
      streams[target.feature][:, window.prefix_end * per_unit:window.stop * per_unit,
                              target.first_level:target.first_level + target.num_levels] = codes

    done: list[WindowRecord] = []
    total_tokens = sum(w.generated for w in windows) * tokens_per_unit
    with tqdm(total=total_tokens, desc=stage.name, unit='tok', disable=not progress,
              dynamic_ncols=True, leave=True) as bar:

      def reporter(rows: int):
        last = [0]

        def report(done: int, _: int):
          bar.update((done - last[0]) * rows)
          last[0] = done

        return report if progress else None

      def decode_args(steps: int) -> dict[str, Any]:
        if not progress:
          return {}
        return {'steps_per_call': min(steps, STEPS_PER_CALL)}

      # Windows without a prefix depend on nothing this stage generates: decode each group of
      # equal shape together (the fine stage's non-overlapping chunks), the rest in order.
      groups: dict[tuple[int, int], list[int]] = {}
      for i, w in enumerate(windows):
        if w.prefix == 0:
          groups.setdefault((w.end - w.start, w.generated), []).append(i)
      batched = {i for members in groups.values() if len(members) > 1 for i in members}
      for members in groups.values():
        if len(members) < 2:
          continue
        prompts = np.stack([self._conditions(stage, windows[i], streams, mulan, melody, batch,
                                             prompt_units) for i in members], axis=1)
        steps = windows[members[0]].generated * tokens_per_unit
        extra = {}
        if guided:
          extra['uncond_prompts'] = pad(np.asarray(spec.null_prompt(prompts), np.int32))
        ids = decoding.decode_chunks(
            stage.model.module, stage.params, pad(prompts), steps,
            row_keys(jax.random.fold_in(rng, members[0])), progress=reporter(len(members)),
            **decode_args(steps), **kwargs, **extra)
        ids = np.asarray(ids)[:batch].reshape(batch, len(members), steps)
        for j, i in enumerate(members):
          write(windows[i], ids[:, j])
          done.append(WindowRecord(stage.name, windows[i], unit, prompts[:, j], steps,
                                   batched=True))
      for i, w in enumerate(windows):
        if i in batched:
          continue
        prompt = self._conditions(stage, w, streams, mulan, melody, batch, prompt_units)
        steps = w.generated * tokens_per_unit
        extra = {}
        if guided:
          extra['uncond_prompt'] = pad(np.asarray(spec.null_prompt(prompt), np.int32))
        ids = decoding.decode(stage.model.module, stage.params, pad(prompt), steps,
                              row_keys(jax.random.fold_in(rng, i)), progress=reporter(1),
                              **decode_args(steps), **kwargs, **extra)
        write(w, np.asarray(ids)[:batch])
        done.append(WindowRecord(stage.name, w, unit, prompt, steps))
    records.extend(sorted(done, key=lambda r: r.window.prefix_end))


def load_pipeline(folder: Union[str, os.PathLike],
                  partitioner: Optional[partitioning.Partitioner] = None, *,
                  mesh_shape: Optional[MeshShape] = None, verify: bool = True) -> Pipeline:
  """`Pipeline.load(folder, partitioner, mesh_shape=..., verify=...)`: a checked folder, ready
  to generate.
  """
  return Pipeline.load(folder, partitioner, mesh_shape=mesh_shape, verify=verify)

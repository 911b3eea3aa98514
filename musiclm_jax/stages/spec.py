"""Stage specs: which token streams form a stage LM's prefix, which one it predicts, and their ids.

MusicLM's three stages are one decoder-only LM (musiclm_jax/stages/model.py) trained on three
token layouts. A `StageSpec` describes a layout; the model, the SeqIO tasks (stages/data.py) and
the sampler (musiclm_jax/generate/) all read it, so they cannot disagree.

Streams. A `TokenStream` is one kind of token of a clip: MuLan conditioning tokens, melody
tokens, semantic tokens, or a range of SoundStream RVQ levels (coarse = levels 1-4, fine =
levels 5-12 of the codec's 12). Its codes are [frames, levels] (a single-level stream has
levels = 1). A stream is either
  - time-aligned (`hop_samples` set): one frame per `hop_samples` audio samples (semantic 960 =
    25 Hz, codec 480 = 50 Hz); a crop of S samples has S / hop_samples frames; or
  - clip-level (`frames` set): a fixed number of frames per clip, whatever the crop (MuLan: one
    frame of 12 RVQ levels; melody: one frame per melody window).

The sequence. A stage's sequence is its conditioning streams (`conditions`, in order) followed
by its predicted stream (`target`); every stream is flattened frame-major (all levels of frame
0, then all levels of frame 1, ...). The loss is on the predicted stream only.

The vocabulary (the contract with the sampler):
  - id 0 is padding and BOS (the first decoder input of every sequence); it is never a token.
  - Each stream level gets its own disjoint range of ids: level l of stream s is
    [offset(s) + l * codebook_size(s), offset(s) + (l + 1) * codebook_size(s)), so a token's id
    tells its stream and level, and codes are ids minus that level's offset.
  - Each droppable conditioning stream (MuLan, melody) reserves ONE more id right after its
    levels: its NULL id. Conditioning dropout (training) and the unconditional prompt of
    classifier-free guidance (sampling) replace every token of a dropped stream by that id, so
    conditional and unconditional prompts have the same length and batch together.
  - Offsets are assigned in stream order from 1 (conditions first, then the target) unless a
    stream sets `offset`; ranges (NULL ids included) that overlap, include id 0 or repeat a stream
    name raise ValueError naming the streams.
  - `vocab_size` is one past the largest id; the model may round it up (StageModel.vocab_multiple);
    ids past `vocab_size` are never targets and `vocab_mask` excludes them.

API used by the sampler:
  spec.flatten({name: codes}) -> (tokens [B, L] int32, loss_weights [B, L] int32)
  spec.flatten_prompt({name: codes}) -> the conditioning prefix only, [B, P]
  spec.encode_stream(name, codes) -> one stream's ids, frame-major, [B, frames * levels]
  spec.unflatten_predicted(tokens) -> target codes [B, frames, levels] (offsets removed)
  spec.null_prompt(prompt) -> the prompt with every droppable stream's tokens set to its NULL id
  spec.vocab_mask(vocab_size=None) -> bool [period, vocab]: the ids allowed at predicted position
    i, which is level i % period of the target (period = target levels, frame-major)
  spec.stream_lengths(crop_seconds), spec.stream_slices(crop_seconds),
  spec.feature_lengths(crop_seconds) -> {'inputs': prefix length, 'targets': target length}
Codes are [batch, frames, levels] arrays of numpy or JAX (a single-level stream may be given as
[batch, frames], a one-frame clip-level stream as [batch, levels]).

The paper's three specs (`semantic_stage_spec`, `coarse_stage_spec`, `fine_stage_spec`) take the
frozen tokenizers' sizes from `TokenSizes` (gin-configurable: models/stages/{tiny,paper}.gin):
  semantic: MuLan (+ melody) -> semantic tokens        (30 s crops in the paper)
  coarse:   MuLan + semantic -> SoundStream levels 1-4 (10 s crops)
  fine:     SoundStream levels 1-4 -> levels 5-12      (3 s crops)
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping, Optional

import gin
import numpy as np

PAD_ID = 0
SAMPLE_RATE = 24000

# Feature names of the stage-token cache (stages/data.py) and of the streams that read them.
SEMANTIC_FEATURE = 'semantic_tokens'
CODEC_FEATURE = 'codec_tokens'
MULAN_FEATURE = 'mulan_tokens'
MELODY_FEATURE = 'melody_tokens'


@dataclasses.dataclass(frozen=True)
class TokenStream:
  """One kind of token of a clip, as a stage uses it (see the module docstring).

  Attributes:
    name: the stream's name in the stage ('mulan', 'melody', 'semantic', 'coarse', 'fine').
    feature: the example feature holding its codes (e.g. 'codec_tokens').
    codebook_size: codes per level.
    num_levels: levels this stream takes from the feature.
    first_level: the feature's first level this stream takes (coarse 0, fine 4 of the codec's
      12); a single-level feature ([frames]) has only level 0.
    hop_samples: time-aligned streams: audio samples per frame (960 semantic, 480 codec).
    frames: clip-level streams: frames per clip (1 for MuLan).
    droppable: a conditioning stream that conditioning dropout may replace by its NULL id.
    offset: the first id of its range; None: placed after the streams before it.
  """
  name: str
  feature: str
  codebook_size: int
  num_levels: int = 1
  first_level: int = 0
  hop_samples: Optional[int] = None
  frames: Optional[int] = None
  droppable: bool = False
  offset: Optional[int] = None

  def __post_init__(self):
    where = f'TokenStream {self.name!r}'
    if not self.name or not self.feature:
      raise ValueError(f'{where}: name and feature must be non-empty')
    if self.codebook_size < 1 or self.num_levels < 1 or self.first_level < 0:
      raise ValueError(f'{where}: codebook_size ({self.codebook_size}) and num_levels '
                       f'({self.num_levels}) must be positive, first_level '
                       f'({self.first_level}) non-negative')
    if (self.hop_samples is None) == (self.frames is None):
      raise ValueError(f'{where}: set exactly one of hop_samples (a time-aligned stream) and '
                       f'frames (a clip-level stream); got hop_samples={self.hop_samples}, '
                       f'frames={self.frames}')
    if (self.hop_samples is not None and self.hop_samples < 1) or (
        self.frames is not None and self.frames < 1):
      raise ValueError(f'{where}: hop_samples and frames must be positive')

  @property
  def time_aligned(self) -> bool:
    return self.hop_samples is not None

  @property
  def num_ids(self) -> int:
    """Ids the stream occupies: its levels' codes, plus the NULL id when droppable."""
    return self.num_levels * self.codebook_size + (1 if self.droppable else 0)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class StageSpec:
  """A stage's token layout: conditioning streams, the predicted stream, and their ids.

  Raises ValueError at construction when stream names repeat, the target is droppable or
  clip-level, or id ranges overlap or include id 0 (the message names the streams).

  Attributes:
    name: the stage ('semantic', 'coarse', 'fine'); names its SeqIO task.
    conditions: the prefix streams, in sequence order.
    target: the predicted stream.
    sample_rate: audio sample rate the hops refer to.
  """
  name: str
  conditions: tuple[TokenStream, ...]
  target: TokenStream
  sample_rate: int = SAMPLE_RATE

  def __post_init__(self):
    object.__setattr__(self, 'conditions', tuple(self.conditions))
    where = f'stage spec {self.name!r}'
    names = [s.name for s in self.streams]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
      raise ValueError(f'{where}: stream names {repeated} repeat')
    if self.target.droppable:
      raise ValueError(f'{where}: the predicted stream {self.target.name!r} cannot be droppable')
    if not self.target.time_aligned:
      raise ValueError(f'{where}: the predicted stream {self.target.name!r} must be time-aligned '
                       '(hop_samples), not clip-level')
    ranges = self._ranges()
    for name, (start, _) in ranges.items():
      if start <= PAD_ID:
        raise ValueError(f'{where}: stream {name!r} starts at id {start}, but id {PAD_ID} is '
                         'padding/BOS; offsets must be at least 1')
    items = sorted(ranges.items(), key=lambda kv: kv[1])
    for (a, (a0, a1)), (b, (b0, b1)) in zip(items, items[1:]):
      if b0 < a1:
        raise ValueError(f'{where}: vocabulary ranges of streams {a!r} [{a0}, {a1}) and {b!r} '
                         f'[{b0}, {b1}) overlap; change their offsets (TokenStream.offset) or '
                         'leave them None to place streams one after another')

  # ---------------------------------------------------------------------------- layout
  @property
  def streams(self) -> tuple[TokenStream, ...]:
    """Conditions, then the target: the order of the sequence."""
    return self.conditions + (self.target,)

  def stream(self, name: str) -> TokenStream:
    for s in self.streams:
      if s.name == name:
        return s
    raise KeyError(f'stage spec {self.name!r} has no stream {name!r} (it has '
                   f'{[s.name for s in self.streams]})')

  @property
  def droppable(self) -> tuple[TokenStream, ...]:
    """The conditioning streams that conditioning dropout / guidance replace by NULL."""
    return tuple(s for s in self.conditions if s.droppable)

  def _ranges(self) -> dict[str, tuple[int, int]]:
    """{stream: [first id, one past its last id (NULL included))}."""
    out, nxt = {}, PAD_ID + 1
    for s in self.streams:
      start = nxt if s.offset is None else int(s.offset)
      out[s.name] = (start, start + s.num_ids)
      nxt = max(nxt, start + s.num_ids)
    return out

  def id_range(self, name: str) -> tuple[int, int]:
    """[first, last + 1) of the ids of stream `name` (its NULL id included)."""
    self.stream(name)
    return self._ranges()[name]

  def offset(self, name: str) -> int:
    """The first id of stream `name` (its level 0)."""
    return self.id_range(name)[0]

  def level_offsets(self, name: str) -> np.ndarray:
    """int32 [levels]: the id of code 0 of each level of stream `name`."""
    s = self.stream(name)
    return (self.offset(name) + s.codebook_size * np.arange(s.num_levels)).astype(np.int32)

  def null_id(self, name: str) -> int:
    """The NULL id of droppable stream `name` (right after its levels)."""
    s = self.stream(name)
    if not s.droppable:
      raise ValueError(f'stage spec {self.name!r}: stream {name!r} is not droppable and has no '
                       'NULL id')
    return self.offset(name) + s.num_levels * s.codebook_size

  @property
  def vocab_size(self) -> int:
    """One past the largest id any stream uses."""
    return max(end for _, end in self._ranges().values())

  @property
  def period(self) -> int:
    """Predicted positions per frame: the target's levels (frame-major order)."""
    return self.target.num_levels

  def describe(self) -> str:
    """A table of the streams, their shapes and id ranges (for logs)."""
    lines = [f'stage {self.name!r}: vocab {self.vocab_size} ids (0 = padding/BOS)']
    for s in self.streams:
      start, end = self.id_range(s.name)
      role = 'predicted' if s is self.target else 'condition'
      rate = (f'{self.sample_rate / s.hop_samples:g} Hz' if s.time_aligned
              else f'{s.frames} frame(s) per clip')
      extra = f', NULL {self.null_id(s.name)}' if s.droppable else ''
      lines.append(f'  {s.name:<9} {role:<9} {s.feature}[levels {s.first_level}..'
                   f'{s.first_level + s.num_levels - 1}] x {s.codebook_size} codes, {rate}: ids '
                   f'[{start}, {end}){extra}')
    return '\n'.join(lines)

  # ---------------------------------------------------------------------------- lengths
  @property
  def crop_unit_samples(self) -> int:
    """Crops are whole multiples of this many samples (lcm of the time-aligned hops)."""
    return functools.reduce(math.lcm, [s.hop_samples for s in self.streams if s.time_aligned])

  def crop_samples(self, crop_seconds: float) -> int:
    """`crop_seconds` in samples; raises unless it is whole frames of every time-aligned stream.
    """
    n = int(round(crop_seconds * self.sample_rate))
    unit = self.crop_unit_samples
    if n < unit or n % unit:
      raise ValueError(f'stage spec {self.name!r}: a crop of {crop_seconds} s ({n} samples) is not '
                       f'a positive multiple of {unit} samples ({unit / self.sample_rate:g} s), '
                       'the frame hops of its time-aligned streams')
    return n

  def stream_frames(self, crop_seconds: float) -> dict[str, int]:
    """{stream: frames} in a crop of `crop_seconds`."""
    n = self.crop_samples(crop_seconds)
    return {s.name: (n // s.hop_samples if s.time_aligned else s.frames) for s in self.streams}

  def stream_lengths(self, crop_seconds: float) -> dict[str, int]:
    """{stream: tokens (frames x levels)} in a crop of `crop_seconds`."""
    frames = self.stream_frames(crop_seconds)
    return {s.name: frames[s.name] * s.num_levels for s in self.streams}

  def stream_slices(self, crop_seconds: float) -> dict[str, slice]:
    """{stream: its positions in the flattened sequence} for a crop of `crop_seconds`."""
    out, start = {}, 0
    for name, n in self.stream_lengths(crop_seconds).items():
      out[name] = slice(start, start + n)
      start += n
    return out

  def feature_lengths(self, crop_seconds: float) -> dict[str, int]:
    """SeqIO task feature lengths: {'inputs': prefix tokens, 'targets': predicted tokens}."""
    lengths = self.stream_lengths(crop_seconds)
    return {'inputs': sum(lengths[s.name] for s in self.conditions),
            'targets': lengths[self.target.name]}

  def sequence_length(self, crop_seconds: float) -> int:
    """Decoder positions of one example: prefix + predicted tokens."""
    return sum(self.feature_lengths(crop_seconds).values())

  # ---------------------------------------------------------------------------- tokens
  def _codes(self, s: TokenStream, codes: Any) -> Any:
    """codes as [batch, frames, levels] (accepting the shorthand shapes)."""
    shape = tuple(np.shape(codes))
    if len(shape) == 3 and shape[2] == s.num_levels:
      out = codes
    elif len(shape) == 2 and s.num_levels == 1:
      out = codes[:, :, None]
    elif len(shape) == 2 and not s.time_aligned and s.frames == 1 and shape[1] == s.num_levels:
      out = codes[:, None, :]
    else:
      raise ValueError(f'stage spec {self.name!r}: stream {s.name!r} codes must be [batch, '
                       f'frames, {s.num_levels}], got shape {shape}')
    if not s.time_aligned and out.shape[1] != s.frames:
      raise ValueError(f'stage spec {self.name!r}: clip-level stream {s.name!r} has '
                       f'{s.frames} frame(s) per clip, got {out.shape[1]}')
    if isinstance(out, np.ndarray):  # concrete codes: check them (traced ones cannot be)
      if not np.issubdtype(out.dtype, np.integer):
        raise TypeError(f'stage spec {self.name!r}: stream {s.name!r} codes must be integers, '
                        f'got {out.dtype}')
      if out.size and (out.min() < 0 or out.max() >= s.codebook_size):
        raise ValueError(f'stage spec {self.name!r}: stream {s.name!r} codes must lie in [0, '
                         f'{s.codebook_size}), got [{out.min()}, {out.max()}]')
    return out

  def encode_stream(self, name: str, codes: Any) -> Any:
    """One stream's ids, frame-major: codes [B, frames, levels] -> int32 [B, frames * levels]."""
    s = self.stream(name)
    xp = _xp(codes)
    c = self._codes(s, codes)
    ids = c.astype(xp.int32) + xp.asarray(self.level_offsets(name))
    return ids.reshape(ids.shape[0], -1)

  def flatten_prompt(self, streams: Mapping[str, Any]) -> Any:
    """The conditioning prefix: int32 [B, P] ids of the condition streams, in order."""
    missing = [s.name for s in self.conditions if s.name not in streams]
    if missing:
      raise KeyError(f'stage spec {self.name!r}: missing condition streams {missing}')
    parts = [self.encode_stream(s.name, streams[s.name]) for s in self.conditions]
    if not parts:
      batch = np.shape(streams[self.target.name])[0] if self.target.name in streams else 1
      return np.zeros((batch, 0), np.int32)
    return _xp(parts[0]).concatenate(parts, axis=1)

  def flatten(self, streams: Mapping[str, Any]) -> tuple[Any, Any]:
    """(tokens int32 [B, L], loss_weights int32 [B, L]) of a whole example.

    Args:
      streams: {stream name: codes} for every stream of the spec (codes without offsets).

    Returns:
      The condition streams then the target, each frame-major with its levels' offsets, and
      loss weights 1 on the target's positions, 0 on the prefix.
    """
    if self.target.name not in streams:
      raise KeyError(f'stage spec {self.name!r}: missing the predicted stream '
                     f'{self.target.name!r}')
    prompt = self.flatten_prompt(streams)
    target = self.encode_stream(self.target.name, streams[self.target.name])
    xp = _xp(target)
    prompt = xp.asarray(prompt)
    if prompt.shape[0] != target.shape[0]:
      raise ValueError(f'stage spec {self.name!r}: batch sizes differ between the prefix '
                       f'({prompt.shape[0]}) and the target ({target.shape[0]})')
    tokens = xp.concatenate([prompt, target], axis=1)
    weights = xp.concatenate([xp.zeros(prompt.shape, xp.int32), xp.ones(target.shape, xp.int32)],
                             axis=1)
    return tokens, weights

  def unflatten_predicted(self, tokens: Any) -> Any:
    """Target codes [B, frames, levels] of predicted ids [B, frames * levels] (or [n]).

    Raises (for concrete numpy ids) when an id is outside its position's level range.
    """
    xp = _xp(tokens)
    squeeze = np.ndim(tokens) == 1
    t = tokens[None] if squeeze else tokens
    n = t.shape[1]
    if n % self.period:
      raise ValueError(f'stage spec {self.name!r}: {n} predicted tokens are not whole frames of '
                       f'{self.period} levels')
    codes = t.reshape(t.shape[0], n // self.period, self.period) - xp.asarray(
        self.level_offsets(self.target.name))
    if isinstance(codes, np.ndarray) and codes.size and (
        codes.min() < 0 or codes.max() >= self.target.codebook_size):
      raise ValueError(f'stage spec {self.name!r}: predicted ids outside the ranges of their '
                       f'levels (codes [{codes.min()}, {codes.max()}], expected [0, '
                       f'{self.target.codebook_size}))')
    codes = codes.astype(xp.int32)
    return codes[0] if squeeze else codes

  def target_levels(self, ids: Any) -> Any:
    """int32 level index (0-based, within the target) of each id; -1 outside the target."""
    xp = _xp(ids)
    start = self.offset(self.target.name)
    size = self.target.codebook_size
    inside = (ids >= start) & (ids < start + size * self.target.num_levels)
    return xp.where(inside, (ids - start) // size, -1).astype(xp.int32)

  def in_stream(self, name: str, ids: Any) -> Any:
    """bool: which ids belong to stream `name` (its NULL id included)."""
    start, end = self.id_range(name)
    return (ids >= start) & (ids < end)

  def drop_streams(self, tokens: Any, drop: Mapping[str, Any]) -> Any:
    """Replaces the tokens of dropped droppable streams by their NULL ids.

    Args:
      tokens: int ids [..., L] (a prompt, a whole sequence, decoder inputs or targets).
      drop: {droppable stream name: bool broadcastable to `tokens` (e.g. [B, 1] per example)}.

    Returns:
      `tokens` with every id of a dropped stream replaced by the stream's NULL id; other ids
      (the predicted stream's included) unchanged.
    """
    xp = _xp(tokens)
    out = tokens
    for name, d in drop.items():
      out = xp.where(self.in_stream(name, tokens) & d, self.null_id(name), out)
    return out

  def null_prompt(self, prompt: Any) -> Any:
    """The unconditional version of a prompt: every droppable stream's tokens -> its NULL id."""
    return self.drop_streams(prompt, {s.name: True for s in self.droppable})

  def vocab_mask(self, vocab_size: Optional[int] = None) -> np.ndarray:
    """bool [period, vocab_size]: row l allows exactly the ids of target level l.

    Predicted position i (0-based from the first predicted token) is level i % period.

    Args:
      vocab_size: columns (the model's vocabulary, possibly rounded up); default the spec's.
    """
    vocab_size = self.vocab_size if vocab_size is None else int(vocab_size)
    if vocab_size < self.vocab_size:
      raise ValueError(f'vocab_size {vocab_size} < the spec\'s {self.vocab_size}')
    mask = np.zeros((self.period, vocab_size), bool)
    size = self.target.codebook_size
    for level, start in enumerate(self.level_offsets(self.target.name)):
      mask[level, start:start + size] = True
    return mask


def _xp(x: Any):
  """numpy for numpy (and Python) values, jax.numpy for JAX arrays and tracers."""
  if isinstance(x, (np.ndarray, np.generic, list, tuple, int)):
    return np
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  return jnp


# ---------------------------------------------------------------------------------------------
# The paper's three stages.


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TokenSizes:
  """Sizes of the frozen tokenizers' outputs that the stage specs are built on.

  They must match the models that made the token cache (checked when a stage task reads it).

  Attributes:
    semantic_codes: k of the semantic tokenizer (k-means clusters; 1024 in the paper).
    semantic_hop_samples: samples per semantic frame (960: 25 Hz at 24 kHz).
    codec_levels: RVQ levels of the codec (12).
    codec_codes: codes per codec level (1024).
    codec_hop_samples: samples per codec frame (480: 50 Hz).
    coarse_levels: the first this-many codec levels are 'coarse' (4); the rest 'fine'.
    mulan_levels: MuLan RVQ levels (12).
    mulan_codes: codes per MuLan level (1024).
    melody_levels: melody RVQ levels (24 in the paper); 0: no melody stream.
    melody_codes: codes per melody level (512).
    melody_frames: melody windows per cached clip (3 per 10 s in the paper).
  """
  semantic_codes: int = 1024
  semantic_hop_samples: int = 960
  codec_levels: int = 12
  codec_codes: int = 1024
  codec_hop_samples: int = 480
  coarse_levels: int = 4
  mulan_levels: int = 12
  mulan_codes: int = 1024
  melody_levels: int = 0
  melody_codes: int = 512
  melody_frames: int = 3

  def __post_init__(self):
    if not 0 < self.coarse_levels < self.codec_levels:
      raise ValueError(f'TokenSizes: coarse_levels ({self.coarse_levels}) must lie in [1, '
                       f'codec_levels={self.codec_levels})')


def _sizes(sizes: Optional[TokenSizes]) -> TokenSizes:
  return TokenSizes() if sizes is None else sizes  # pylint: disable=no-value-for-parameter


def mulan_stream(sizes: TokenSizes) -> TokenStream:
  return TokenStream('mulan', MULAN_FEATURE, sizes.mulan_codes, sizes.mulan_levels, frames=1,
                     droppable=True)


def melody_stream(sizes: TokenSizes) -> TokenStream:
  return TokenStream('melody', MELODY_FEATURE, sizes.melody_codes, sizes.melody_levels,
                     frames=sizes.melody_frames, droppable=True)


def semantic_stream(sizes: TokenSizes) -> TokenStream:
  return TokenStream('semantic', SEMANTIC_FEATURE, sizes.semantic_codes,
                     hop_samples=sizes.semantic_hop_samples)


def coarse_stream(sizes: TokenSizes) -> TokenStream:
  return TokenStream('coarse', CODEC_FEATURE, sizes.codec_codes, sizes.coarse_levels,
                     hop_samples=sizes.codec_hop_samples)


def fine_stream(sizes: TokenSizes) -> TokenStream:
  return TokenStream('fine', CODEC_FEATURE, sizes.codec_codes,
                     sizes.codec_levels - sizes.coarse_levels, first_level=sizes.coarse_levels,
                     hop_samples=sizes.codec_hop_samples)


@gin.configurable
def semantic_stage_spec(sizes: Optional[TokenSizes] = None, name: str = 'semantic') -> StageSpec:
  """MuLan tokens (+ melody tokens when TokenSizes.melody_levels > 0) -> semantic tokens."""
  sizes = _sizes(sizes)
  conditions = [mulan_stream(sizes)]
  if sizes.melody_levels:
    conditions.append(melody_stream(sizes))
  return StageSpec(name, tuple(conditions), semantic_stream(sizes))


@gin.configurable
def coarse_stage_spec(sizes: Optional[TokenSizes] = None, name: str = 'coarse',
                      mulan: bool = True) -> StageSpec:
  """MuLan + semantic tokens -> SoundStream levels 1..coarse_levels (coarse acoustic tokens).

  Args:
    sizes: the token sizes (default: `TokenSizes()`).
    name: the stage's name.
    mulan: condition on the MuLan tokens as the paper does; False: on the semantic tokens only
      (an ablation: the caption then reaches the timbre only through the semantic tokens; on
      the tiny recipe it learned no faster, README "How much a coarse run varies").
  """
  sizes = _sizes(sizes)
  conditions = (mulan_stream(sizes), semantic_stream(sizes)) if mulan else (
      semantic_stream(sizes),)
  return StageSpec(name, conditions, coarse_stream(sizes))


@gin.configurable
def fine_stage_spec(sizes: Optional[TokenSizes] = None, name: str = 'fine') -> StageSpec:
  """Coarse acoustic tokens -> the remaining SoundStream levels (fine acoustic tokens)."""
  sizes = _sizes(sizes)
  return StageSpec(name, (coarse_stream(sizes),), fine_stream(sizes))


@gin.configurable
def stage_feature_lengths(spec: StageSpec = gin.REQUIRED, crop_seconds: float = gin.REQUIRED,
                          examples_per_row: int = 1) -> dict[str, int]:
  """DatasetConfig.task_feature_lengths of a stage in gin: `spec.feature_lengths(crop_seconds)`.

  Args:
    spec: the stage.
    crop_seconds: the crop.
    examples_per_row: room for this many whole crops per row (packing, DatasetConfig.pack; the
      stage task then needs the crop given explicitly, `stage_task.crop_seconds`).
  """
  if examples_per_row < 1:
    raise ValueError(f'stage_feature_lengths.examples_per_row={examples_per_row}: at least 1')
  return {k: v * examples_per_row for k, v in spec.feature_lengths(crop_seconds).items()}


STAGE_SPECS: dict[str, Any] = {
    'semantic': semantic_stage_spec,
    'coarse': coarse_stage_spec,
    'fine': fine_stage_spec,
}


def stage_specs(sizes: Optional[TokenSizes] = None) -> dict[str, StageSpec]:
  """{'semantic', 'coarse', 'fine': spec} with the given sizes (default: `TokenSizes()`, the
  paper's unless gin binds them)."""
  sizes = _sizes(sizes)
  return {name: fn(sizes) for name, fn in STAGE_SPECS.items()}

r"""Memorization check of the semantic stage (MusicLM section 5): greedy continuations of clips.

The paper's test: prompt the semantic stage with a training example's MuLan tokens and the
first s seconds of its semantic tokens, decode T = 5 s greedily, and count the examples whose
continuation reproduces the example's true next T seconds, exactly or approximately, as a
function of the prompt length s.

  .venv/bin/python -m musiclm_jax.generate.memorization --stage_dir=runs/semantic_stage_tiny \
    --cache_dir=runs/stage_tokens_tiny --split=train --num_examples=32 \
    --prompt_seconds=0,1,2,5 --generate_seconds=5 --out=/tmp/memorization.json

Definitions (per example, comparing generated codes with the true continuation's codes):
  exact match        every generated token equals the true one.
  token accuracy     the fraction of positions whose tokens are equal (order-sensitive).
  matching cost      the optimal-transport (earth mover's) cost between the two token
                     histograms: the minimum over one-to-one matchings of the n generated tokens
                     to the n true tokens of the mean distance between matched tokens. Two
                     sequences of n equal-mass tokens make this an assignment problem, solved
                     exactly (scipy's linear_sum_assignment); the paper solves the same
                     transport problem approximately (Sinkhorn). Token distance: the Euclidean
                     distance between the semantic tokenizer's k-means centroids of the two
                     tokens divided by the mean distance between distinct centroids (a cost of
                     1 is "as far apart as two typical tokens"); without centroids, 0 for equal
                     and 1 for different tokens, which makes the cost 1 - (histogram overlap).
  approximate match  matching cost < a threshold. The paper calibrates its threshold on
                     pairs of unrelated sequences; its value depends on the tokenizer (the
                     centroids' scale, the codebook), so here, unless given, the
                     threshold is the `calibration_quantile` (default 1%) quantile of the costs
                     of negative pairs: the true continuations of two different training
                     examples (of different tunes when `groups` say which are renderings of one
                     tune). At most that fraction of unrelated pairs then counts as
                     approximate matches, by construction (strictly below: with 0/1 distances
                     many costs tie).
  This follows the paper's description (histograms of semantic tokens, a matching cost between
  them, a threshold calibrated on non-matching pairs) as far as it could be reconstructed; the
  exact text of section 5 was not available when this was written.

References, computed the same way for every prompt length:
  chance    the model's continuation of example i against the true continuation of another
            example j (a random partner, of another tune when `groups` are given): what the
            statistics are worth without memorisation.
  hold      (s > 0) the last prompt frame repeated T seconds long, against the truth: the
            tiny tokenizers' tokens come in long runs, so a high token accuracy alone proves
            little.

The prompt window starts at the clip's first frame; prompt + continuation must fit both the
examples and the stage's trained window (the crop of stage.json; relative position biases would
run past what training saw otherwise). Only stages whose conditioning streams are clip-level
(MuLan, melody: the semantic stage) are supported.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from musiclm_jax.common.tf_setup import quiet_tensorflow
from musiclm_jax.common import atomic

logger = logging.getLogger(__name__)

DEFAULT_PROMPT_SECONDS = (0.0, 1.0, 2.0, 5.0)
DEFAULT_GENERATE_SECONDS = 5.0
DEFAULT_CALIBRATION_QUANTILE = 0.01
MAX_CALIBRATION_PAIRS = 2048
GROUP_FEATURE = 'melody_id'  # renderings / transpositions of one tune share it (embedded_music)
ID_FEATURE = 'id'

# ---------------------------------------------------------------------------------------------
# Match statistics (pure numpy).


def _pair(generated: Any, target: Any) -> tuple[np.ndarray, np.ndarray]:
  generated, target = np.asarray(generated), np.asarray(target)
  generated = generated[None] if generated.ndim == 1 else generated
  target = target[None] if target.ndim == 1 else target
  if generated.ndim != 2 or generated.shape != target.shape:
    raise ValueError(f'generated {generated.shape} and target {target.shape} must both be '
                     '[examples, tokens] of one shape')
  if generated.shape[1] == 0:
    raise ValueError('cannot compare empty token sequences')
  return generated, target


def exact_matches(generated: Any, target: Any) -> np.ndarray:
  """bool [N]: whether each generated row equals its target row token for token."""
  generated, target = _pair(generated, target)
  return np.all(generated == target, axis=1)


def token_accuracy(generated: Any, target: Any) -> np.ndarray:
  """float [N]: the fraction of positions where the generated token equals the target's."""
  generated, target = _pair(generated, target)
  return np.mean(generated == target, axis=1)


def token_distances(centroids: Any) -> np.ndarray:
  """float [k, k]: Euclidean distances between codebook centroids [k, dim], unit mean.

  Divided by the mean distance between distinct centroids, so that matching costs do not
  depend on the embedding's scale (1 = two typical tokens apart).
  """
  c = np.asarray(centroids, np.float64)
  if c.ndim != 2 or c.shape[0] < 2:
    raise ValueError(f'centroids must be [k >= 2, dim], got shape {c.shape}')
  squared = np.sum(c * c, axis=1)
  d = np.sqrt(np.maximum(squared[:, None] + squared[None, :] - 2.0 * c @ c.T, 0.0))
  np.fill_diagonal(d, 0.0)
  k = c.shape[0]
  mean = d.sum() / (k * (k - 1))
  if not mean > 0:
    raise ValueError('all centroids coincide: no token distance to measure')
  return d / mean


def matching_cost(generated: Any, target: Any,
                  distances: Optional[np.ndarray] = None) -> np.ndarray:
  """float [N]: optimal-transport cost between the token histograms of each row pair.

  The minimum, over one-to-one matchings of a row's n generated tokens to its n target tokens,
  of the mean distance between matched tokens (exact: an assignment problem). It depends only
  on the two histograms, not on token order.

  Args:
    generated, target: int codes [N, n] (or [n]).
    distances: float [k, k] token distances (`token_distances`); None: 0 between equal and 1
      between different tokens, where the cost is 1 - sum(min(histograms)) / n.
  """
  generated, target = _pair(generated, target)
  n = generated.shape[1]
  if distances is None:
    costs = np.empty(len(generated))
    for i, (g, t) in enumerate(zip(generated, target)):
      values, counts_g = np.unique(g, return_counts=True)
      counts_t = np.array([np.sum(t == v) for v in values])
      costs[i] = 1.0 - np.minimum(counts_g, counts_t).sum() / n
    return costs
  from scipy.optimize import linear_sum_assignment  # pylint: disable=g-import-not-at-top
  distances = np.asarray(distances, np.float64)
  k = distances.shape[0]
  if distances.shape != (k, k):
    raise ValueError(f'distances must be square [k, k], got {distances.shape}')
  low = min(generated.min(), target.min())
  high = max(generated.max(), target.max())
  if low < 0 or high >= k:
    raise ValueError(f'codes must lie in [0, {k}) (the distance table), got [{low}, {high}]')
  costs = np.empty(len(generated))
  for i, (g, t) in enumerate(zip(generated, target)):
    # A transport problem between distinct values weighted by their counts would be smaller;
    # the n x n assignment is as exact and takes about a millisecond at n = 125.
    table = distances[g][:, t]
    rows, cols = linear_sum_assignment(table)
    costs[i] = table[rows, cols].sum() / n
  return costs


def chance_partners(n: int, groups: Optional[Sequence[Any]] = None, seed: int = 0
                    ) -> np.ndarray:
  """int [n]: for each example a random other one, of another group where one exists.

  Args:
    n: number of examples (>= 2).
    groups: optional group key per example (e.g. the tune a rendering comes from): partners
      are drawn from other groups when there are any, else from the other examples.
    seed: the draw's seed.
  """
  if n < 2:
    raise ValueError(f'the chance reference needs at least 2 examples, got {n}')
  rng = np.random.default_rng(seed)
  keys = np.arange(n) if groups is None else np.asarray(list(groups), object)
  if len(keys) != n:
    raise ValueError(f'groups has {len(keys)} entries for {n} examples')
  out = np.empty(n, np.int64)
  for i in range(n):
    others = np.flatnonzero(keys != keys[i])
    if not len(others):
      others = np.delete(np.arange(n), i)
    out[i] = rng.choice(others)
  return out


def negative_pairs(n: int, groups: Optional[Sequence[Any]] = None, max_pairs: int = 1024,
                   seed: int = 0) -> np.ndarray:
  """int [pairs, 2]: ordered pairs (i, j) of different examples (different groups when given).

  All of them when there are at most `max_pairs`, else `max_pairs` drawn without replacement.
  """
  keys = np.arange(n) if groups is None else np.asarray(list(groups), object)
  i, j = np.nonzero(keys[:, None] != keys[None, :])
  pairs = np.stack([i, j], axis=1)
  if len(pairs) > max_pairs:
    keep = np.random.default_rng(seed).choice(len(pairs), max_pairs, replace=False)
    pairs = pairs[np.sort(keep)]
  return pairs


def match_statistics(generated: Any, target: Any, threshold: float,
                     distances: Optional[np.ndarray] = None) -> dict[str, Any]:
  """Counts, fractions and means of exact / approximate matches of row pairs.

  Returns:
    {'examples', 'exact', 'exact_fraction', 'approximate', 'approximate_fraction',
     'token_accuracy' (mean), 'matching_cost' (mean), 'per_example': {'exact',
     'approximate', 'token_accuracy', 'matching_cost'} lists}.
  """
  exact = exact_matches(generated, target)
  accuracy = token_accuracy(generated, target)
  cost = matching_cost(generated, target, distances)
  approximate = cost < threshold
  n = len(exact)
  return {
      'examples': n,
      'exact': int(exact.sum()), 'exact_fraction': float(exact.mean()),
      'approximate': int(approximate.sum()), 'approximate_fraction': float(approximate.mean()),
      'token_accuracy': float(accuracy.mean()), 'matching_cost': float(cost.mean()),
      'per_example': {'exact': exact.tolist(), 'approximate': approximate.tolist(),
                      'token_accuracy': [round(float(x), 4) for x in accuracy],
                      'matching_cost': [round(float(x), 4) for x in cost]},
  }


# ---------------------------------------------------------------------------------------------
# Prompts and greedy continuations.


def _frames(seconds: float, spec: Any, what: str) -> int:
  """Whole frames of the predicted stream in `seconds` (raises naming `what` otherwise)."""
  hop = spec.target.hop_samples
  exact = float(seconds) * spec.sample_rate / hop
  frames = int(round(exact))
  if frames < 0 or abs(frames - exact) > 1e-6:
    raise ValueError(f'{what}={seconds:g} s is not a whole number of {spec.target.name} frames '
                     f'({spec.sample_rate / hop:g} per second)')
  return frames


def target_codes(spec: Any, examples: Mapping[str, Any]) -> np.ndarray:
  """int32 [N, frames, levels]: the predicted stream's codes from the examples' feature."""
  s = spec.target
  if s.feature not in examples:
    raise KeyError(f'examples have no {s.feature!r} (the {s.name} tokens stage {spec.name!r} '
                   f'predicts); they have {sorted(examples)}')
  codes = np.asarray(examples[s.feature])
  if codes.ndim == 2:
    codes = codes[:, :, None]
  if codes.ndim != 3 or codes.shape[2] < s.first_level + s.num_levels:
    raise ValueError(f'examples[{s.feature!r}] must be [N, frames] or [N, frames, levels >= '
                     f'{s.first_level + s.num_levels}], got shape {np.shape(examples[s.feature])}')
  return codes[:, :, s.first_level:s.first_level + s.num_levels].astype(np.int32)


def condition_prompt(spec: Any, examples: Mapping[str, Any]) -> np.ndarray:
  """int32 [N, 1 + P]: BOS (id 0) and the flattened conditioning streams of each example."""
  codes = {}
  for s in spec.conditions:
    if s.time_aligned:
      raise ValueError(f'stage {spec.name!r} is conditioned on the time-aligned stream '
                       f'{s.name!r}: the memorization check supports stages whose conditions '
                       'are clip-level (MuLan, melody), i.e. the semantic stage')
    if s.feature not in examples:
      raise KeyError(f'examples have no {s.feature!r} (stream {s.name!r} of stage '
                     f'{spec.name!r}); they have {sorted(examples)}')
    c = np.asarray(examples[s.feature]).astype(np.int32)
    if c.ndim == 2 and s.frames == 1:
      c = c[:, None, :]  # MuLan: [N, levels]
    elif c.ndim == 2 and s.num_levels == 1:
      c = c[:, :, None]
    if c.ndim != 3 or c.shape[2] < s.first_level + s.num_levels:
      raise ValueError(f'examples[{s.feature!r}] has shape {np.shape(examples[s.feature])}; '
                       f'stream {s.name!r} needs [N, {s.frames}, {s.num_levels}]')
    codes[s.name] = c[:, :, s.first_level:s.first_level + s.num_levels]
  n = len(target_codes(spec, examples))
  prompt = (np.asarray(spec.flatten_prompt(codes), np.int32) if codes
            else np.zeros((n, 0), np.int32))
  return np.concatenate([np.zeros((n, 1), np.int32), prompt], axis=1)


def continuation_prompts(spec: Any, examples: Mapping[str, Any], prompt_frames: int
                         ) -> np.ndarray:
  """int32 [N, 1 + P + prompt_frames * levels]: BOS, conditions, first frames of the target."""
  codes = target_codes(spec, examples)
  prefix = np.asarray(spec.encode_stream(spec.target.name, codes[:, :prompt_frames]), np.int32)
  return np.concatenate([condition_prompt(spec, examples), prefix], axis=1)


def greedy_continuations(model: Any, params: Any, prompts: np.ndarray, num_frames: int, *,
                         batch_size: int = 16, progress: Optional[Any] = None) -> np.ndarray:
  """int32 [N, num_frames, levels]: the stage's greedy continuation of each prompt row.

  Rows are decoded `batch_size` at a time in one jitted call each (the last batch is padded by
  repeating its last row, so every call has one shape: one compilation per prompt length).

  Args:
    model: the `StageModel`.
    params: its Decoder's parameters.
    prompts: int32 [N, P] (`continuation_prompts`), ending at a frame boundary.
    num_frames: frames of the predicted stream to generate.
    batch_size: rows per decode call.
    progress: optional callable(rows done) called after each batch.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from musiclm_jax.generate import decoding  # pylint: disable=g-import-not-at-top
  spec = model.spec
  if batch_size < 1:
    raise ValueError(f'batch_size must be positive, got {batch_size}')
  steps = num_frames * spec.period
  if steps < 1:
    raise ValueError(f'nothing to generate (num_frames={num_frames})')
  vocab_mask = spec.vocab_mask(model.config.vocab_size)
  prompts = np.asarray(prompts, np.int32)
  n = len(prompts)
  batch = min(batch_size, n)
  out = []
  for start in range(0, n, batch):
    rows = prompts[start:start + batch]
    real = len(rows)
    if real < batch:
      rows = np.concatenate([rows, np.repeat(rows[-1:], batch - real, axis=0)])
    ids = decoding.decode(model.module, params, rows, steps, jax.random.PRNGKey(0),
                          temperature=0.0, vocab_mask=vocab_mask)
    ids = np.asarray(jax.device_get(ids))[:real]
    out.append(np.asarray(spec.unflatten_predicted(ids), np.int32))
    if progress is not None:
      progress(real)
  return np.concatenate(out, axis=0)


# ---------------------------------------------------------------------------------------------
# The check.


def _flat(codes: np.ndarray) -> np.ndarray:
  return codes.reshape(len(codes), -1)


def memorization_check(model: Any,
                       params: Any,
                       examples: Mapping[str, Any],
                       *,
                       prompt_seconds: Sequence[float] = DEFAULT_PROMPT_SECONDS,
                       generate_seconds: float = DEFAULT_GENERATE_SECONDS,
                       window_seconds: Optional[float] = None,
                       distances: Optional[np.ndarray] = None,
                       approximate_threshold: Optional[float] = None,
                       calibration_quantile: float = DEFAULT_CALIBRATION_QUANTILE,
                       groups: Optional[Sequence[Any]] = None,
                       batch_size: int = 16,
                       seed: int = 0,
                       progress: bool = False) -> dict[str, Any]:
  """Greedy continuations of training examples against their truth, per prompt length.

  See the module docstring for the definitions of the matches and of the references.

  Args:
    model: the semantic `StageModel` (any stage with clip-level conditions).
    params: its Decoder's parameters (e.g. `export.load_stage_dir(...)[1]`).
    examples: {cache feature: [N, ...] arrays}: the conditions' features (`mulan_tokens`
      [N, levels], `melody_tokens` when the stage has melody) and the predicted stream's
      (`semantic_tokens` [N, frames]), clips starting at their first frame.
    prompt_seconds: prompt lengths s to try (0 = conditions only).
    generate_seconds: T, the continuation's length.
    window_seconds: the stage's trained window (stage.json crop_seconds); s + T may not exceed
      it. None: not checked.
    distances: token distances for the matching cost (`token_distances` of the semantic
      tokenizer's centroids); None: 0/1 distances.
    approximate_threshold: matching cost below which a pair is an approximate match;
      None: calibrated as the `calibration_quantile` of the negative pairs' costs.
    calibration_quantile: see `approximate_threshold`.
    groups: optional group per example (e.g. the tune of each rendering); negative pairs and
      chance partners are then taken across groups.
    batch_size: rows per jitted decode.
    seed: seed of the chance partners and of the sampled negative pairs.
    progress: show a tqdm bar over prompt lengths and batches (stderr).

  Returns:
    A JSON-ready dict: 'settings', 'threshold' (value, how it was set, negative-pair cost
    quantiles), 'rows' (one per prompt length: 'prompt_seconds', 'prompt_tokens',
    'generated_tokens', 'constant_continuations' (how many repeat a single token), and
    'model' / 'chance' / 'hold' statistics from `match_statistics`),
    'examples' (ids when the examples carry an 'id' feature), 'chance_partners', 'seconds'.

  Raises:
    ValueError: a prompt length or T that is not whole frames, s + T longer than the examples
      or than `window_seconds`, fewer than 2 examples, time-aligned conditions, bad shapes.
    KeyError: a feature the stage needs is missing from the examples.
  """
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from flax.core import meta  # pylint: disable=g-import-not-at-top
  began = time.time()
  spec = model.spec
  codes = target_codes(spec, examples)
  n, available = codes.shape[:2]
  if n < 2:
    raise ValueError(f'the memorization check needs at least 2 examples (the chance reference '
                     f'pairs them), got {n}')
  if not 0.0 < calibration_quantile < 1.0:
    raise ValueError(f'calibration_quantile must lie in (0, 1), got {calibration_quantile}')
  prompt_seconds = sorted({float(s) for s in prompt_seconds})
  if not prompt_seconds:
    raise ValueError('prompt_seconds is empty')
  generate_frames = _frames(generate_seconds, spec, 'generate_seconds')
  if generate_frames < 1:
    raise ValueError(f'generate_seconds={generate_seconds:g} s generates nothing')
  prompt_frames = {s: _frames(s, spec, 'prompt_seconds') for s in prompt_seconds}
  fps = spec.sample_rate / spec.target.hop_samples
  longest = max(prompt_seconds) + float(generate_seconds)
  if max(prompt_frames.values()) + generate_frames > available:
    raise ValueError(f'prompt_seconds={max(prompt_seconds):g} + generate_seconds='
                     f'{generate_seconds:g} = {longest:g} s is longer than the examples '
                     f'({available} {spec.target.name} frames = {available / fps:g} s)')
  if window_seconds is not None and longest > float(window_seconds) + 1e-9:
    raise ValueError(f'prompt_seconds={max(prompt_seconds):g} + generate_seconds='
                     f'{generate_seconds:g} = {longest:g} s exceeds the window of '
                     f'{float(window_seconds):g} s the stage was trained on (stage.json '
                     'crop_seconds)')
  if groups is not None and len(groups) != n:
    raise ValueError(f'groups has {len(groups)} entries for {n} examples')
  condition_prompt(spec, examples)  # fail on missing conditions before any compilation
  if distances is not None and (spec.period != 1 or
                                len(distances) != spec.target.codebook_size):
    raise ValueError(f'distances [{len(distances)}, {len(distances)}] do not fit the '
                     f'{spec.target.codebook_size} codes of stream {spec.target.name!r} '
                     '(one level expected)')

  partners = chance_partners(n, groups, seed)
  # Negative pairs (true continuations of unrelated examples) for the threshold.
  per_length = max(1, MAX_CALIBRATION_PAIRS // len(prompt_seconds))
  negatives = []
  for s in prompt_seconds:
    window = _flat(codes[:, prompt_frames[s]:prompt_frames[s] + generate_frames])
    pairs = negative_pairs(n, groups, per_length, seed)
    negatives.append(matching_cost(window[pairs[:, 0]], window[pairs[:, 1]], distances))
  negatives = np.concatenate(negatives)
  if approximate_threshold is None:
    threshold = float(np.quantile(negatives, calibration_quantile))
    source = f'calibrated: the {calibration_quantile:g} quantile of negative-pair costs'
  else:
    threshold = float(approximate_threshold)
    source = 'given'

  params = jax.device_put(meta.unbox(params))  # once, not at every decode call
  rows = []
  with tqdm(total=n * len(prompt_seconds), desc='memorization', unit='example',
            disable=not progress, dynamic_ncols=True) as bar:
    for s in prompt_seconds:
      frames = prompt_frames[s]
      bar.set_postfix_str(f'prompt {s:g} s')
      prompts = continuation_prompts(spec, examples, frames)
      generated = _flat(greedy_continuations(model, params, prompts, generate_frames,
                                             batch_size=batch_size, progress=bar.update))
      truth = _flat(codes[:, frames:frames + generate_frames])
      constant = np.all(generated == generated[:, :1], axis=1)
      row = {'prompt_seconds': s, 'prompt_frames': frames,
             'prompt_tokens': int(prompts.shape[1]),
             'generated_tokens': int(generated.shape[1]),
             # Greedy decoding of a small model often locks onto one token: worth knowing
             # when reading the matches (compare with the 'hold' reference).
             'constant_continuations': int(constant.sum()),
             'model': match_statistics(generated, truth, threshold, distances),
             'chance': match_statistics(generated, truth[partners], threshold, distances),
             'hold': None}
      if frames:
        hold = _flat(np.repeat(codes[:, frames - 1:frames], generate_frames, axis=1))
        row['hold'] = match_statistics(hold, truth, threshold, distances)
      rows.append(row)

  ids = examples.get(ID_FEATURE)
  return {
      'settings': {'stage': spec.name, 'prompt_seconds': prompt_seconds,
                   'generate_seconds': float(generate_seconds),
                   'generate_frames': generate_frames, 'frames_per_second': fps,
                   'window_seconds': None if window_seconds is None else float(window_seconds),
                   'examples': n, 'example_frames': int(available), 'decoding': 'greedy',
                   'batch_size': batch_size, 'seed': seed},
      'threshold': {
          'value': threshold, 'source': source,
          'distance': ('Euclidean between k-means centroids / their mean' if distances is not None
                       else '0/1 (cost = 1 - histogram overlap)'),
          'negative_pairs': int(len(negatives)),
          'negative_cost_quantiles': {
              str(q): float(np.quantile(negatives, q)) for q in (0.01, 0.05, 0.5)},
          'negatives_below': float(np.mean(negatives < threshold))},
      'rows': rows,
      'examples': None if ids is None else [_text(x) for x in ids],
      'chance_partners': partners.tolist(),
      'seconds': round(time.time() - began, 1),
  }


def _text(x: Any) -> str:
  return x.decode('utf-8', 'replace') if isinstance(x, bytes) else str(x)


def markdown(report: Mapping[str, Any]) -> str:
  """The report as a Markdown table: one row per prompt length, model then references."""
  header = ('| prompt s | prompt tokens | N | exact | approx. | token acc. | cost | '
            'chance exact | chance approx. | chance token acc. | chance cost | '
            'hold token acc. | hold approx. | constant gen. |')
  lines = [header, '|' + '---|' * (header.count('|') - 1)]

  def count(stats, key):
    return f'{stats[key]} ({stats[key + "_fraction"]:.1%})'

  for row in report['rows']:
    m, c, h = row['model'], row['chance'], row['hold']
    cells = [f'{row["prompt_seconds"]:g}', str(row['prompt_tokens']), str(m['examples']),
             count(m, 'exact'), count(m, 'approximate'), f'{m["token_accuracy"]:.3f}',
             f'{m["matching_cost"]:.3f}', count(c, 'exact'), count(c, 'approximate'),
             f'{c["token_accuracy"]:.3f}', f'{c["matching_cost"]:.3f}',
             '-' if h is None else f'{h["token_accuracy"]:.3f}',
             '-' if h is None else count(h, 'approximate'),
             str(row['constant_continuations'])]
    lines.append('| ' + ' | '.join(cells) + ' |')
  t, st = report['threshold'], report['settings']
  lines.append('')
  lines.append(f'Greedy continuations of {st["generate_seconds"]:g} s ({st["generate_frames"]} '
               f'frames); approximate = matching cost < {t["value"]:.4f} ({t["source"]}; '
               f'distance {t["distance"]}; {t["negatives_below"]:.1%} of '
               f'{t["negative_pairs"]} negative pairs below it).')
  return '\n'.join(lines)


# ---------------------------------------------------------------------------------------------
# Reading a stage, a token cache and the semantic tokenizer's centroids.


def load_stage(path: str) -> tuple[Any, Any, dict[str, Any]]:
  """(StageModel, Decoder params, stage.json record) of an exported stage dir or a training run.

  A training run (config.gin + checkpoints/) is exported into a temporary directory first
  (`export.export_stage`, the latest checkpoint; this parses its config.gin into gin).
  """
  from musiclm_jax.generate import export  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(path):
    raise FileNotFoundError(f'--stage_dir {path!r}: no such directory')
  if os.path.isfile(os.path.join(path, export.STAGE_RECORD)):
    return export.load_stage_dir(path)
  if not os.path.isfile(os.path.join(path, 'config.gin')):
    raise FileNotFoundError(f'--stage_dir {path!r}: neither an exported stage '
                            f'({export.STAGE_RECORD}) nor a training run (config.gin + '
                            'checkpoints/)')
  with tempfile.TemporaryDirectory(prefix='memorization-stage-') as tmp:
    # load_stage_dir returns host copies: nothing refers to the files once they are removed.
    return export.load_stage_dir(export.export_stage(path, os.path.join(tmp, 'stage')))


def find_token_cache(cache_dir: str, split: str, tokens_task: Optional[str] = None) -> str:
  """The directory of a stage-token cache holding `split` (info.SPLIT.json + tfrecords).

  `cache_dir` is the cache's task directory itself, or a SeqIO cache directory holding task
  directories (the one with `split`, or `tokens_task`).
  """
  if not os.path.isdir(cache_dir):
    raise FileNotFoundError(f'--cache_dir {cache_dir!r}: no such directory')
  info = f'info.{split}.json'
  if tokens_task is not None:
    task_dir = os.path.join(cache_dir, tokens_task)
    if not os.path.isfile(os.path.join(task_dir, info)):
      raise FileNotFoundError(f'{task_dir}: no {info} (no cached {split!r} split of task '
                              f'{tokens_task!r})')
    return task_dir
  if os.path.isfile(os.path.join(cache_dir, info)):
    return cache_dir
  found = sorted(d for d in os.listdir(cache_dir)
                 if os.path.isfile(os.path.join(cache_dir, d, info)))
  if not found:
    raise FileNotFoundError(f'--cache_dir {cache_dir!r}: no token cache with a {split!r} split '
                            f'({info}) in it or in its subdirectories (run `musiclm-jax '
                            'tokenize` first)')
  if len(found) > 1:
    raise ValueError(f'--cache_dir {cache_dir!r} holds several caches {found}; choose one with '
                     '--tokens_task')
  return os.path.join(cache_dir, found[0])


def read_cached_examples(task_dir: str, split: str, features: Sequence[str],
                         num_examples: int, min_frames: int = 0,
                         frames_feature: Optional[str] = None) -> dict[str, np.ndarray]:
  """The first `num_examples` examples of a cached split (shards in order), as numpy arrays.

  Args:
    task_dir: the cache's task directory (`find_token_cache`).
    split: 'train', 'validation', ...
    features: the features to read (each must be in the cache); 'id' and 'melody_id' are
      added when the cache has them.
    num_examples: how many.
    min_frames: skip clips whose `frames_feature` is shorter than this.
    frames_feature: the time-aligned feature `min_frames` counts.

  Returns:
    {feature: [N, ...] array} (clips cut to the shortest kept one), plus 'skipped_short'.

  Raises:
    FileNotFoundError: an incomplete cache or no shards.
    KeyError: a feature the cache does not hold (e.g. a cache without semantic tokens).
    ValueError: fewer than `num_examples` usable examples.
  """
  tf = quiet_tensorflow()
  info_path = os.path.join(task_dir, f'info.{split}.json')
  if not os.path.isfile(os.path.join(task_dir, 'COMPLETED')):
    raise FileNotFoundError(f'{task_dir}: no COMPLETED marker (the cache is incomplete; '
                            'finish `musiclm-jax tokenize`)')
  with open(info_path) as f:
    info = json.load(f)
  cached = info['features']
  missing = [k for k in features if k not in cached]
  if missing:
    raise KeyError(f'{info_path}: the cache has no {missing} (it has {sorted(cached)}); '
                   'tokenize the corpus with the tokenizers the stage reads')
  wanted = list(dict.fromkeys(list(features) + [k for k in (ID_FEATURE, GROUP_FEATURE)
                                                 if k in cached]))

  def parser_of(name):
    shape, dtype = cached[name]['shape'], cached[name]['dtype']
    stored = tf.int64 if dtype in ('int32', 'int64', 'bool') else tf.as_dtype(dtype)
    if shape and shape[0] is None:
      if any(x is None for x in shape[1:]):
        raise ValueError(f'{info_path}: feature {name!r} of shape {shape} is ragged')
      return tf.io.FixedLenSequenceFeature(shape[1:], stored, allow_missing=True)
    return tf.io.FixedLenFeature(shape, stored)

  description = {k: parser_of(k) for k in wanted}
  shards = sorted(f for f in os.listdir(task_dir) if f.startswith(f'{split}.tfrecord-'))
  if not shards:
    raise FileNotFoundError(f'{task_dir}: no {split}.tfrecord-* shards')
  dataset = tf.data.TFRecordDataset([os.path.join(task_dir, f) for f in shards]).map(
      lambda pb: tf.io.parse_single_example(pb, description))
  rows, skipped = [], 0
  for ex in dataset.as_numpy_iterator():
    if frames_feature is not None and len(ex[frames_feature]) < min_frames:
      skipped += 1
      continue
    rows.append(ex)
    if len(rows) == num_examples:
      break
  if len(rows) < num_examples:
    raise ValueError(f'{task_dir}: split {split!r} has only {len(rows)} examples with at least '
                     f'{min_frames} frames of {frames_feature!r} ({skipped} shorter), '
                     f'{num_examples} asked for')
  out: dict[str, Any] = {}
  for k in wanted:
    values = [r[k] for r in rows]
    if np.ndim(values[0]) and cached[k]['shape'][0] is None:
      length = min(len(v) for v in values)
      values = [v[:length] for v in values]
    array = np.stack(values)
    if cached[k]['dtype'] in ('int32', 'bool'):
      array = array.astype(cached[k]['dtype'])
    out[k] = array
  out['skipped_short'] = np.asarray(skipped)
  return out


def semantic_centroids(task_dir: str, tokenizer_dir: Optional[str] = 'auto'
                       ) -> tuple[Optional[np.ndarray], str]:
  """(k-means centroids [k, dim] or None, where they came from) for the matching cost.

  Args:
    task_dir: the token cache; with `tokenizer_dir='auto'` its provenance.json names the
      semantic tokenizer that made it (used when its fingerprint still matches).
    tokenizer_dir: a semantic tokenizer directory, 'auto', or None / 'none' (no centroids).
  """
  from musiclm_jax.data.frozen_tokenizer import _restore_numpy  # pylint: disable=g-import-not-at-top
  if tokenizer_dir is None or str(tokenizer_dir).lower() == 'none':
    return None, 'none asked for'
  expected_sha = None
  if tokenizer_dir == 'auto':
    try:
      with open(os.path.join(task_dir, 'provenance.json')) as f:
        provenance = json.load(f)
      entry = next(t for t in provenance.get('tokenizers', [])
                   if t.get('output_feature') == 'semantic_tokens')
      tokenizer_dir = os.path.dirname(os.path.normpath(entry['weights']['path']))
      expected_sha = entry.get('params_sha256')
    except (OSError, KeyError, StopIteration, ValueError, TypeError) as e:
      return None, f'not found in {task_dir}/provenance.json ({type(e).__name__})'
  record_path = os.path.join(tokenizer_dir, 'tokenizer.json')
  if not os.path.isfile(record_path):
    if expected_sha is not None:  # 'auto': the tokenizer moved; measure without centroids
      return None, f'{record_path} missing'
    raise FileNotFoundError(f'--semantic_tokenizer_dir {tokenizer_dir!r}: no tokenizer.json')
  with open(record_path) as f:
    record = json.load(f)
  if expected_sha is not None and record.get('params_sha256') != expected_sha:
    return None, (f'{tokenizer_dir} is not the tokenizer that made the cache (fingerprint '
                  'differs)')
  centroids = _restore_numpy(os.path.join(os.path.abspath(tokenizer_dir), 'variables'),
                             {'c': 'params/centroids'})['c']
  return np.asarray(centroids, np.float32), os.path.abspath(tokenizer_dir)


# ---------------------------------------------------------------------------------------------
# Command line.


def write_json(path: str, value: Any) -> None:
  """Writes JSON atomically: a temporary file beside `path`, then os.replace."""
  atomic.write_json(path, value)


def _seconds_list(text: str) -> list[float]:
  try:
    values = [float(x) for x in text.split(',') if x.strip()]
  except ValueError as e:
    raise ValueError(f'--prompt_seconds {text!r}: comma-separated seconds, e.g. 0,1,2,5') from e
  if not values or any(v < 0 or not math.isfinite(v) for v in values):
    raise ValueError(f'--prompt_seconds {text!r}: non-negative seconds, e.g. 0,1,2,5')
  return values


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='python -m musiclm_jax.generate.memorization', description=__doc__.split('\n')[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--stage_dir', required=True,
                      help='an exported semantic stage (stage.json) or its training run')
  parser.add_argument('--cache_dir', required=True,
                      help='the stage-token cache the stage was trained on (or its parent)')
  parser.add_argument('--tokens_task', default=None,
                      help='the cache task directory under --cache_dir (when it holds several)')
  parser.add_argument('--split', default='train')
  parser.add_argument('--num_examples', type=int, default=32)
  parser.add_argument('--prompt_seconds', default='0,1,2,5')
  parser.add_argument('--generate_seconds', type=float, default=DEFAULT_GENERATE_SECONDS)
  parser.add_argument('--batch_size', type=int, default=16)
  parser.add_argument('--approximate_threshold', type=float, default=None,
                      help='matching cost below which a continuation is an approximate match '
                      '(default: calibrated on negative pairs)')
  parser.add_argument('--calibration_quantile', type=float,
                      default=DEFAULT_CALIBRATION_QUANTILE)
  parser.add_argument('--semantic_tokenizer_dir', default='auto',
                      help="centroids for token distances: a tokenizer dir, 'auto' (the one "
                      "the cache's provenance names) or 'none' (0/1 distances)")
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--out', default=None, help='write the JSON report here (atomically)')
  parser.add_argument('--no_progress', action='store_true')
  return parser


def run(args: argparse.Namespace) -> dict[str, Any]:
  """Loads the stage and the examples named by the parsed arguments and runs the check."""
  if args.num_examples < 2:
    raise ValueError(f'--num_examples={args.num_examples}: at least 2 (the chance reference '
                     'pairs examples)')
  prompt_seconds = _seconds_list(args.prompt_seconds)
  if not os.path.isdir(args.stage_dir):
    raise FileNotFoundError(f'--stage_dir {args.stage_dir!r}: no such directory')
  task_dir = find_token_cache(args.cache_dir, args.split, args.tokens_task)
  model, params, record = load_stage(args.stage_dir)
  spec = model.spec
  window = record.get('crop_seconds')
  longest = max(prompt_seconds) + args.generate_seconds
  if window is not None and longest > float(window) + 1e-9:
    raise ValueError(f'--prompt_seconds max {max(prompt_seconds):g} + --generate_seconds '
                     f'{args.generate_seconds:g} = {longest:g} s exceeds the {float(window):g} '
                     f's window stage {args.stage_dir} was trained on')
  needed = _frames(longest, spec, 'prompt_seconds + generate_seconds')
  features = [s.feature for s in spec.conditions] + [spec.target.feature]
  examples = read_cached_examples(task_dir, args.split, features, args.num_examples,
                                  min_frames=needed, frames_feature=spec.target.feature)
  skipped = int(examples.pop('skipped_short'))
  centroids, where = (None, 'not used: the stage predicts several levels')
  if spec.period == 1:
    centroids, where = semantic_centroids(task_dir, args.semantic_tokenizer_dir)
  distances = None
  if centroids is None:
    logger.warning('matching costs use 0/1 token distances (k-means centroids: %s)', where)
  else:
    if len(centroids) != spec.target.codebook_size:
      raise ValueError(f'the semantic tokenizer {where} has {len(centroids)} centroids, the '
                       f'stage {spec.target.codebook_size} codes')
    distances = token_distances(centroids)
  report = memorization_check(
      model, params, examples, prompt_seconds=prompt_seconds,
      generate_seconds=args.generate_seconds, window_seconds=window, distances=distances,
      approximate_threshold=args.approximate_threshold,
      calibration_quantile=args.calibration_quantile, groups=examples.get(GROUP_FEATURE),
      batch_size=args.batch_size, seed=args.seed, progress=not args.no_progress)
  report['source'] = {
      'stage_dir': os.path.abspath(args.stage_dir), 'stage': record.get('source'),
      'cache': os.path.abspath(task_dir), 'split': args.split, 'skipped_short': skipped,
      'centroids': where, 'groups': GROUP_FEATURE if GROUP_FEATURE in examples else None}
  return report


def main(argv: Optional[Sequence[str]] = None) -> int:
  """The command line; returns the exit status (2 with one line on stderr for bad input)."""
  parser = build_parser()
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.WARNING)
  from musiclm_jax.main import setup_compilation_cache  # pylint: disable=g-import-not-at-top
  setup_compilation_cache()
  argv = sys.argv[1:] if argv is None else list(argv)
  try:
    report = run(args)
  except (FileNotFoundError, KeyError, ValueError) as e:
    message = e.args[0] if isinstance(e, KeyError) and e.args else e
    print(f'memorization: {message}', file=sys.stderr)
    return 2
  report['source']['command'] = ' '.join(
      ['python -m musiclm_jax.generate.memorization'] + argv)
  print(markdown(report))
  if args.out:
    write_json(args.out, report)
    print(f'wrote {args.out}')
  return 0


if __name__ == '__main__':
  raise SystemExit(main())

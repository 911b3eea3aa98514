"""MuLan evaluation: corpus-wide retrieval, zero-shot attribute classification, and MCC.

* `retrieval_recall`: text -> audio and audio -> text recall@k over a whole split (every clip's
  embedding against every caption's, not within batches), beside chance k / N.
* `zero_shot_accuracy`: classify clips by the nearest class embedding (an ensemble of prompts
  worded like the captions: "a solo {x}", "{x} melody", ..., see `attribute_prompts`) and
  compare with the ground truth, beside chance (the majority rate: always answering the most
  common class). `embedded_music_attributes` derives the instrument, tempo class (the bands of
  musiclm_jax/data/embedded_music/captions.tempo_band) and drums labels of embedded_music.
* `mulan_cycle_consistency` (MCC): the mean cosine between each caption's text embedding and the
  audio embedding of the audio generated from it; it scores generated music later.
* `evaluate_split`: all of it over a split of an audio task, with any embedder (e.g. a
  `MuLanConditioner` from musiclm_jax/mulan/conditioning.py).

Embeddings are unit vectors (cosine = dot product); the functions normalise what they are given.
"""
from __future__ import annotations

import collections
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np

from musiclm_jax.common import atomic

EmbedAudio = Callable[[np.ndarray], np.ndarray]   # [B, samples] -> [B, D]
EmbedText = Callable[[Sequence[str]], np.ndarray]  # texts -> [N, D]

# Zero-shot prompts: several per class, worded as the corpus's captions and aspect lists word
# them (musiclm_jax/data/embedded_music/captions.py); a class is the normalised mean of its
# prompts' embeddings (CLIP's prompt ensembling).
INSTRUMENT_TEMPLATES = ('{}', 'a solo {}', '{} melody', 'a tune played on {a}',
                        'The recording features a folk tune played on {a}.')
VOICE_PROMPTS = {'humming': ('humming', 'someone humming', 'a voice humming a folk tune',
                             'humming, vocal, no instruments'),
                 'whistling': ('whistling', 'someone whistling', 'a person whistling a tune',
                               'whistling, no instruments')}
TEMPO_TEMPLATES = ('{} tempo', 'The tempo is {}.')  # over captions.TEMPO_WORDS of the band
DRUMS_PROMPTS = {'yes': ('drums', 'A simple drum beat keeps time.', 'Drums play a steady groove.',
                         'A light drum pattern follows the meter.'),
                 'no': ('no drums', 'There are no drums.', 'There is no percussion.',
                        'The tune is played without drums.')}
Prompts = Union[str, Sequence[str]]


def _unit(x: Any) -> np.ndarray:
  x = np.asarray(x, np.float64)
  if x.ndim != 2:
    raise ValueError(f'embeddings must be [N, D], got shape {x.shape}')
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _groups(texts: Optional[Sequence[str]], n: int) -> np.ndarray:
  if texts is None:
    return np.arange(n)
  if len(texts) != n:
    raise ValueError(f'{len(texts)} texts for {n} embeddings')
  index: dict[str, int] = {}
  return np.asarray([index.setdefault(t, len(index)) for t in texts])


def retrieval_ranks(query: Any, keys: Any, texts: Optional[Sequence[str]] = None) -> np.ndarray:
  """0-based rank of each query's own key (row i pairs with key i) among all keys.

  The rank counts the keys scoring strictly higher than the own key, leaving out keys whose
  text equals the query's own text (the same caption twice is not a miss).

  Args:
    query: [N, D] embeddings.
    keys: [N, D] embeddings, key i the pair of query i.
    texts: optional N captions of the pairs (for the duplicates rule).

  Returns:
    int64 [N] ranks.
  """
  q, k = _unit(query), _unit(keys)
  if q.shape != k.shape:
    raise ValueError(f'query {q.shape} and keys {k.shape} differ')
  sim = q @ k.T
  own = np.diagonal(sim)[:, None]
  groups = _groups(texts, len(q))
  other = groups[None, :] != groups[:, None]
  return np.sum((sim > own) & other, axis=1)


def retrieval_recall(audio_emb: Any, text_emb: Any, ks: Sequence[int] = (1, 10),
                     texts: Optional[Sequence[str]] = None) -> dict[str, float]:
  """Corpus-wide recall@k both ways, with chance.

  Args:
    audio_emb: [N, D] clip embeddings.
    text_emb: [N, D] embeddings of their captions (row i describes clip i).
    ks: the k of recall@k.
    texts: optional captions (identical captions do not count against each other).

  Returns:
    {'recall@k/text_to_audio', 'recall@k/audio_to_text', 'chance@k' (= min(k, N) / N) for each
    k, 'num_pairs'}.
  """
  a2t = retrieval_ranks(audio_emb, text_emb, texts)
  t2a = retrieval_ranks(text_emb, audio_emb, texts)
  n = len(a2t)
  out: dict[str, float] = {'num_pairs': float(n)}
  for k in ks:
    out[f'recall@{k}/text_to_audio'] = float(np.mean(t2a < k))
    out[f'recall@{k}/audio_to_text'] = float(np.mean(a2t < k))
    out[f'chance@{k}'] = min(k, n) / n
  return out


def zero_shot_predict(audio_emb: Any, prompt_emb: Any) -> np.ndarray:
  """Index of the nearest prompt (cosine) for each clip: [N, D] x [C, D] -> int64 [N]."""
  return np.argmax(_unit(audio_emb) @ _unit(prompt_emb).T, axis=-1)


def zero_shot_accuracy(audio_emb: Any, prompt_emb: Any, classes: Sequence[str],
                       labels: Sequence[Any]) -> dict[str, float]:
  """Zero-shot classification accuracy beside chance.

  Args:
    audio_emb: [N, D] clip embeddings.
    prompt_emb: [C, D] embeddings of one prompt per class.
    classes: the C class names, in `prompt_emb`'s order.
    labels: per clip, its class name, or a collection of acceptable class names (a clip with
      several instruments is right when the prediction is any of them).

  Returns:
    {'accuracy', 'chance' (the majority rate: the largest fraction of clips that always
    answering one class would get right), 'balanced_accuracy' (the mean over the classes that
    occur of the accuracy on the clips of that class: skewed classes cannot inflate it),
    'uniform_chance' (the expected accuracy, and balanced accuracy, of guessing uniformly at
    random: the mean of |labels| / C), 'num_examples', 'num_classes'}.
  """
  classes = list(classes)
  if len(classes) != np.shape(prompt_emb)[0]:
    raise ValueError(f'{len(classes)} classes for {np.shape(prompt_emb)[0]} prompts')
  sets = [{lab} if isinstance(lab, str) else set(lab) for lab in labels]
  if len(sets) != np.shape(audio_emb)[0]:
    raise ValueError(f'{len(sets)} labels for {np.shape(audio_emb)[0]} clips')
  pred = zero_shot_predict(audio_emb, prompt_emb)
  n = len(sets)
  right = [classes[p] in s for p, s in zip(pred, sets)]
  counts = collections.Counter(c for s in sets for c in s if c in classes)
  chance = max(counts.values()) / n if counts else 0.0
  per_class = [np.mean([r for r, s in zip(right, sets) if c in s]) for c in classes
               if counts[c]]
  return {'accuracy': sum(right) / n, 'chance': chance,
          'balanced_accuracy': float(np.mean(per_class)) if per_class else 0.0,
          'uniform_chance': float(np.mean([len(s & set(classes)) for s in sets]) / len(classes)),
          'num_examples': float(n), 'num_classes': float(len(classes))}


def tempo_class(tempo_bpm: float) -> str:
  """'slow', 'medium' or 'fast' with embedded_music's caption bands."""
  from musiclm_jax.data.embedded_music.captions import tempo_band  # pylint: disable=g-import-not-at-top
  return tempo_band(float(tempo_bpm))


def embedded_music_attributes(examples: Mapping[str, Sequence[Any]]) -> dict[str, list[Any]]:
  """Ground-truth labels of embedded_music examples.

  Args:
    examples: columns 'instruments' (per clip a list of str or bytes), 'tempo_bpm', 'drums'.

  Returns:
    {'instrument': per clip the set of its instruments, 'tempo': 'slow' | 'medium' | 'fast',
    'drums': 'yes' | 'no'}.
  """
  text = lambda x: x.decode('utf-8') if isinstance(x, bytes) else str(x)
  return {'instrument': [{text(i) for i in row} for row in examples['instruments']],
          'tempo': [tempo_class(t) for t in examples['tempo_bpm']],
          'drums': ['yes' if bool(d) else 'no' for d in examples['drums']]}


def with_article(word: str) -> str:
  """word with its indefinite article ('a flute', 'an oboe')."""
  return ('an ' if word[:1].lower() in 'aeiou' else 'a ') + word


def instrument_prompts(instrument: str) -> tuple[str, ...]:
  """The zero-shot prompts of one instrument class (or 'humming' / 'whistling')."""
  if instrument in VOICE_PROMPTS:
    return VOICE_PROMPTS[instrument]
  return tuple(t.format(instrument, a=with_article(instrument)) for t in INSTRUMENT_TEMPLATES)


def attribute_prompts(instruments: Sequence[str]) -> dict[str, dict[str, tuple[str, ...]]]:
  """{attribute: {class: prompts}} for the instrument, tempo and drums zero-shot tasks."""
  from musiclm_jax.data.embedded_music.captions import TEMPO_WORDS  # pylint: disable=g-import-not-at-top
  tempo = {band: tuple(t.format(w) for t in TEMPO_TEMPLATES for w in words)
           for band, words in TEMPO_WORDS.items()}
  return {'instrument': {i: instrument_prompts(i) for i in instruments},
          'tempo': tempo, 'drums': dict(DRUMS_PROMPTS)}


def class_embeddings(embed_text: EmbedText, class_prompts: Sequence[Prompts]) -> np.ndarray:
  """[C, D] unit class embeddings: each the normalised mean of its prompts' unit embeddings.

  `class_prompts[c]` is one prompt (str) or several (a prompt ensemble).
  """
  groups = [[p] if isinstance(p, str) else list(p) for p in class_prompts]
  if any(not g for g in groups):
    raise ValueError('every class needs at least one prompt')
  flat = [p for g in groups for p in g]
  emb = _unit(embed_text(flat))
  bounds = np.cumsum([0] + [len(g) for g in groups])
  return _unit(np.stack([emb[a:b].mean(axis=0) for a, b in zip(bounds[:-1], bounds[1:])]))


def zero_shot_attributes(audio_emb: Any, embed_text: EmbedText,
                         attributes: Mapping[str, Sequence[Any]],
                         prompts: Mapping[str, Mapping[str, Prompts]]
                         ) -> dict[str, dict[str, float]]:
  """`zero_shot_accuracy` for each attribute, its classes embedded by `class_embeddings`."""
  out = {}
  for name, class_prompts in prompts.items():
    classes = list(class_prompts)
    prompt_emb = class_embeddings(embed_text, [class_prompts[c] for c in classes])
    out[name] = zero_shot_accuracy(audio_emb, prompt_emb, classes, attributes[name])
  return out


def mulan_cycle_consistency(texts: Sequence[str], audio: Any, embed_text: EmbedText,
                            embed_audio: EmbedAudio) -> float:
  """MCC: the mean cosine between each text and the audio generated from it.

  Args:
    texts: N captions (prompts).
    audio: [N, samples] audio, row i generated from texts[i].
    embed_text: texts -> [N, D] embeddings.
    embed_audio: audio -> [N, D] embeddings (e.g. `MuLanConditioner.embed_audio`, averaging
      10 s windows).

  Returns:
    The mean cosine in [-1, 1].
  """
  audio = np.asarray(audio)
  if len(texts) != len(audio):
    raise ValueError(f'{len(texts)} texts for {len(audio)} clips')
  return paired_cosine(embed_text(list(texts)), embed_audio(audio))


def paired_cosine(text_emb: Any, audio_emb: Any) -> float:
  """Mean cosine of row-paired embeddings [N, D] x [N, D]."""
  t, a = _unit(text_emb), _unit(audio_emb)
  if t.shape != a.shape:
    raise ValueError(f'text {t.shape} and audio {a.shape} embeddings differ')
  return float(np.mean(np.sum(t * a, axis=-1)))


def read_split(task: str, split: str, clip_samples: int,
               features: Sequence[str] = ('caption', 'instruments', 'tempo_bpm', 'drums'),
               max_examples: Optional[int] = None, tfds_data_dir: Optional[str] = None,
               module: str = 'tasks.audio', seed: int = 0) -> dict[str, list[Any]]:
  """Reads a split of an audio task in order: {'audio': [N, clip_samples] float32, features}.

  Each clip is cropped (seeded by `seed`) or zero-padded to `clip_samples`; string features
  come back as str.
  """
  import importlib  # pylint: disable=g-import-not-at-top
  import seqio  # pylint: disable=g-import-not-at-top
  importlib.import_module(module)
  previous = seqio.utils._TFDS_DATA_DIR_OVERRIDE  # pylint: disable=protected-access
  if tfds_data_dir:
    seqio.set_tfds_data_dir_override(tfds_data_dir)
  try:
    ds = seqio.get_mixture_or_task(task).get_dataset(
        {'audio': int(clip_samples)}, split=split, shuffle=False, num_epochs=1, seed=seed)
    out: dict[str, list[Any]] = {'audio': [], **{f: [] for f in features}}
    for i, ex in enumerate(ds.as_numpy_iterator()):
      if max_examples is not None and i >= max_examples:
        break
      out['audio'].append(np.asarray(ex['audio'], np.float32))
      for f in features:
        v = ex[f]
        if isinstance(v, bytes):
          v = v.decode('utf-8')
        elif isinstance(v, np.ndarray) and v.dtype == object:
          v = [x.decode('utf-8') if isinstance(x, bytes) else x for x in v]
        out[f].append(v)
  finally:
    seqio.set_tfds_data_dir_override(previous)
  out['audio'] = np.stack(out['audio']) if out['audio'] else np.zeros((0, clip_samples),
                                                                      np.float32)
  return out


def evaluate_split(embed_audio: EmbedAudio, embed_text: EmbedText, task: str = 'embedded_music',
                   split: str = 'test', clip_samples: int = 240000, ks: Sequence[int] = (1, 10),
                   max_examples: Optional[int] = None, tfds_data_dir: Optional[str] = None,
                   batch_size: int = 16) -> dict[str, Any]:
  """Recall both ways and zero-shot attribute accuracy over a split of embedded_music.

  Clips are skipped when their caption is empty (as in training).

  Returns:
    {'retrieval': `retrieval_recall`'s dict, 'zero_shot': {'instrument' | 'tempo' | 'drums':
    `zero_shot_accuracy`'s dict}}.
  """
  data = read_split(task, split, clip_samples, max_examples=max_examples,
                    tfds_data_dir=tfds_data_dir)
  keep = [i for i, c in enumerate(data['caption']) if c.strip()]
  data = {k: ([v[i] for i in keep] if isinstance(v, list) else v[keep]) for k, v in data.items()}
  audio_emb = np.concatenate([np.asarray(embed_audio(data['audio'][i:i + batch_size]))
                              for i in range(0, len(keep), batch_size)])
  text_emb = np.asarray(embed_text(data['caption']))
  attributes = embedded_music_attributes(data)
  instruments = sorted({i for row in attributes['instrument'] for i in row})
  return {'retrieval': retrieval_recall(audio_emb, text_emb, ks, texts=data['caption']),
          'zero_shot': zero_shot_attributes(audio_emb, embed_text, attributes,
                                            attribute_prompts(instruments))}


def format_report(result: Mapping[str, Any]) -> str:
  """`evaluate_split`'s result as a Markdown table, each figure beside chance."""
  r = result['retrieval']
  lines = ['| metric | MuLan | chance |', '|---|---:|---:|']
  ks = sorted(int(k.split('@')[1]) for k in r if k.startswith('chance@'))
  for k in ks:
    for way in ('text_to_audio', 'audio_to_text'):
      lines.append(f"| recall@{k} {way.replace('_to_', ' -> ')} | {r[f'recall@{k}/{way}']:.3f} "
                   f"| {r[f'chance@{k}']:.3f} |")
  for name, z in result['zero_shot'].items():
    lines.append(f"| zero-shot {name} ({int(z['num_classes'])} classes) | {z['accuracy']:.3f} "
                 f"| {z['chance']:.3f} |")
    if 'balanced_accuracy' in z:
      lines.append(f"| zero-shot {name}, balanced | {z['balanced_accuracy']:.3f} "
                   f"| {z['uniform_chance']:.3f} |")
  lines.append(f"\n{int(r['num_pairs'])} clips. Chance: k / N for recall; for zero-shot "
               'accuracy the majority-class rate, for balanced accuracy (the mean of the '
               'per-class accuracies) uniform guessing.')
  return '\n'.join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
  """`python -m musiclm_jax.mulan.metrics --conditioner_dir D [--split test]`: the report."""
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(
      prog='python -m musiclm_jax.mulan.metrics',
      description='Corpus-wide retrieval recall and zero-shot attribute accuracy of a MuLan '
                  'conditioner (musiclm-jax fit_conditioner) over a split of embedded_music.')
  parser.add_argument('--conditioner_dir', required=True)
  parser.add_argument('--task', default='embedded_music')
  parser.add_argument('--split', default='test')
  parser.add_argument('--clip_samples', type=int, default=240000)
  parser.add_argument('--max_examples', type=int, default=None)
  parser.add_argument('--tfds_data_dir', default=None)
  parser.add_argument('--out', default=None, help='also write the result as JSON here')
  args = parser.parse_args(argv)
  from musiclm_jax.mulan.conditioning import load_conditioner  # pylint: disable=g-import-not-at-top
  cond = load_conditioner(args.conditioner_dir)
  result = evaluate_split(cond.embed_audio, cond.embed_text, task=args.task, split=args.split,
                          clip_samples=args.clip_samples, max_examples=args.max_examples,
                          tfds_data_dir=args.tfds_data_dir)
  result['conditioner_dir'] = args.conditioner_dir
  result['split'] = args.split
  print(format_report(result))
  if args.out:
    atomic.write_json(args.out, result, indent=1, sort_keys=False)
  return 0


if __name__ == '__main__':
  raise SystemExit(main())

"""What the semantic tokens carry: melody and rhythm versus timbre, against a log-mel baseline.

On the embedded corpus every clip stores the notes its melody voice sounds (`melody_notes`) and
what plays it, so each 25 Hz frame has ground-truth labels:

  pitch class   of the melody note sounding at the frame's centre (frames in rests left out)
  pitch         the same note's MIDI pitch (register included)
  onset         whether a melody note starts within the frame (rhythm)
  timbre        the melody's instrument, or 'hum' / 'whistle' (one label per clip)

Two representations are compared, each as discrete tokens and as continuous frames:

  semantic      the tokenizer's w2v-BERT layer (embeddings) and its k-means tokens
  log-mel       the tokenizer's own log-mel front end averaged over the 4 frames of each 25 Hz
                frame (the encoder's input) and k-means with the same k fitted on the same
                training frames: the baseline the pre-training must beat

Token measures: normalised mutual information (NMI) and cluster purity of tokens against each
label on the test split. Frame measures: a linear probe (multinomial logistic regression on
standardised frames, trained on training-split frames, scored on the test split; balanced
accuracy for the rare onsets) beside the majority-class rate.

  .venv/bin/python -m musiclm_jax.semantic.probe --tokenizer_dir=runs/semantic_tokenizer_tiny
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from musiclm_jax.common.tf_setup import quiet_tensorflow
from musiclm_jax.semantic import tokenizer as tokenizer_lib

FRAME_RATE = 25.0
LABELS = ('pitch_class', 'pitch', 'onset', 'timbre')


# ---------------------------------------------------------------------------
# Label measures
# ---------------------------------------------------------------------------


def purity(tokens: np.ndarray, labels: np.ndarray) -> float:
  """Fraction of items whose label is their token's most common label."""
  tokens, labels = np.asarray(tokens).ravel(), np.asarray(labels).ravel()
  if not len(tokens):
    return float('nan')
  _, t = np.unique(tokens, return_inverse=True)
  _, lab = np.unique(labels, return_inverse=True)
  table = np.zeros((t.max() + 1, lab.max() + 1), np.int64)
  np.add.at(table, (t, lab), 1)
  return float(table.max(axis=1).sum() / len(tokens))


def nmi(tokens: np.ndarray, labels: np.ndarray) -> float:
  """Normalised mutual information (arithmetic normalisation, as scikit-learn's default)."""
  from sklearn.metrics import normalized_mutual_info_score  # pylint: disable=g-import-not-at-top
  return float(normalized_mutual_info_score(np.asarray(labels).ravel(),
                                            np.asarray(tokens).ravel()))


def majority_rate(labels: np.ndarray) -> float:
  _, counts = np.unique(np.asarray(labels).ravel(), return_counts=True)
  return float(counts.max() / counts.sum())


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                 test_y: np.ndarray, balanced: bool = False, seed: int = 0) -> float:
  """Test accuracy (or balanced accuracy) of logistic regression on standardised features."""
  from sklearn.linear_model import LogisticRegression  # pylint: disable=g-import-not-at-top
  from sklearn.metrics import balanced_accuracy_score  # pylint: disable=g-import-not-at-top
  from sklearn.exceptions import ConvergenceWarning  # pylint: disable=g-import-not-at-top
  mean, std = train_x.mean(axis=0), train_x.std(axis=0) + 1e-6
  clf = LogisticRegression(max_iter=300, random_state=seed,
                           class_weight='balanced' if balanced else None)
  with warnings.catch_warnings():  # 300 iterations are plenty for a comparison; quiet
    warnings.simplefilter('ignore', ConvergenceWarning)
    clf.fit((train_x - mean) / std, train_y)
  pred = clf.predict((test_x - mean) / std)
  if balanced:
    return float(balanced_accuracy_score(test_y, pred))
  return float(np.mean(pred == test_y))


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


def frame_labels(example: dict[str, Any], num_frames: int) -> dict[str, np.ndarray]:
  """Per-frame labels (see the module docstring); pitch is -1 in rests."""
  from musiclm_jax.data.embedded_music.notes import frame_pitches  # pylint: disable=g-import-not-at-top
  notes = np.asarray(example['melody_notes'], np.float64).reshape(-1, 3)
  pitch = frame_pitches(notes, num_frames, FRAME_RATE)
  onset = np.zeros(num_frames, np.int32)
  starts = np.floor(notes[:, 0] * FRAME_RATE).astype(int)
  onset[starts[(starts >= 0) & (starts < num_frames)]] = 1
  timbre = example['timbre']
  timbre = timbre.decode() if isinstance(timbre, bytes) else str(timbre)
  if timbre == 'instrument':
    first = example['instruments'][0]
    timbre = first.decode() if isinstance(first, bytes) else str(first)
  return {'pitch': pitch, 'pitch_class': np.where(pitch >= 0, pitch % 12, -1),
          'onset': onset, 'timbre': np.full(num_frames, timbre, dtype=object)}


def load_examples(split: str, tfds_data_dir: Optional[str], max_examples: Optional[int],
                  dataset: str = 'embedded_music/default:1.1.0') -> list[dict[str, Any]]:
  """Clips of the embedded corpus with the fields the labels need (audio as float32)."""
  quiet_tensorflow()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from musiclm_jax.data import embedded_music  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  ds = tfds.load(dataset, split=split, data_dir=tfds_data_dir, shuffle_files=False)
  out = []
  for ex in tfds.as_numpy(ds):
    if max_examples is not None and len(out) >= max_examples:
      break
    out.append({'audio': np.asarray(ex['audio'], np.float32) / 32768.0,
                'melody_notes': ex['melody_notes'], 'timbre': ex['timbre'],
                'instruments': list(ex['instruments'])})
  if not out:
    raise ValueError(f'{dataset}:{split} in {tfds_data_dir or "the default TFDS dir"} is empty')
  return out


# ---------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------


class Representations:
  """Semantic embeddings (the tokenizer's layer and `extra_layers`), tokens and log-mel frames."""

  def __init__(self, tokenizer_dir: str, extra_layers: Sequence[int] = ()):
    self.module = tokenizer_lib.tokenizer_module(tokenizer_dir)
    tok = tokenizer_lib.load_semantic_tokenizer(tokenizer_dir, input_samples=960)
    self.variables = jax.device_put(tok.variables())
    encoder = self.module.encoder
    bad = [layer for layer in extra_layers if not 0 <= layer <= self.module.layer]
    if bad:
      raise ValueError(f'layers {bad}: the tokenizer stores the encoder up to its layer '
                       f'{self.module.layer} only')
    self.extra_layers = tuple(extra_layers)

    def features(variables, audio):
      tokens = self.module.apply(variables, audio, method='tokenize')
      emb = {layer: encoder.apply({'params': variables['params']['encoder']}, audio, layer,
                                  method='embed') for layer in self.extra_layers}
      emb[self.module.layer] = self.module.apply(variables, audio, method='embed')
      frames = encoder.num_frames(audio.shape[-1])
      mel = encoder.front_end(audio)[:, :frames * 4]
      mel = mel.reshape(mel.shape[0], frames, 4, mel.shape[-1]).mean(axis=2)
      return emb, tokens, mel

    self._features = jax.jit(features)

  def __call__(self, clips: list[dict[str, Any]], batch_size: int = 8):
    """({layer: [clips, frames, embed]}, tokens [clips, frames], log-mel [clips, frames, mels])."""
    embs, tokens, mels = [], [], []
    for i in range(0, len(clips), batch_size):
      audio = np.stack([c['audio'] for c in clips[i:i + batch_size]])
      n = len(audio)
      if n < batch_size:  # one compiled shape
        audio = np.concatenate([audio, np.zeros((batch_size - n,) + audio.shape[1:], np.float32)])
      e, t, m = jax.device_get(self._features(self.variables, jnp.asarray(audio)))
      embs.append({k: v[:n] for k, v in e.items()})
      tokens.append(t[:n])
      mels.append(m[:n])
    emb = {k: np.concatenate([e[k] for e in embs]) for k in embs[0]}
    return emb, np.concatenate(tokens), np.concatenate(mels)


def run_probe(tokenizer_dir: str, tfds_data_dir: Optional[str] = None,
              train_examples: int = 240, test_examples: Optional[int] = None,
              max_train_frames: int = 30000, seed: int = 0,
              extra_layers: Sequence[int] = (), split: str = 'test') -> dict[str, Any]:
  """The measures of the module docstring, as a JSON-able dict.

  `extra_layers`: other encoder layers (up to the tokenizer's) given the linear probes too.
  `split`: where the measures are taken ('validation' to choose a layer, 'test' to report).
  """
  from musiclm_jax.semantic import kmeans  # pylint: disable=g-import-not-at-top
  start = time.time()
  reps = Representations(tokenizer_dir, extra_layers)
  k = reps.module.num_clusters
  train = load_examples('train', tfds_data_dir, train_examples)
  test = load_examples(split, tfds_data_dir, test_examples)
  tr_embs, _, tr_mel = reps(train)
  te_embs, te_tok, te_mel = reps(test)
  frames = te_tok.shape[1]
  layer = reps.module.layer
  tr_emb, te_emb = tr_embs[layer], te_embs[layer]

  def stacked(clips):
    labels = [frame_labels(c, frames) for c in clips]
    return {name: np.concatenate([lab[name] for lab in labels]) for name in LABELS}

  tr_lab, te_lab = stacked(train), stacked(test)
  tr_emb, tr_mel = tr_emb.reshape(-1, tr_emb.shape[-1]), tr_mel.reshape(-1, tr_mel.shape[-1])
  te_emb, te_mel = te_emb.reshape(-1, te_emb.shape[-1]), te_mel.reshape(-1, te_mel.shape[-1])
  rng = np.random.default_rng(seed)
  keep = np.sort(rng.choice(len(tr_emb), min(max_train_frames, len(tr_emb)), replace=False))
  mel_km = kmeans.fit_kmeans(tr_mel[keep], k, num_iters=50, rng=jax.random.PRNGKey(seed))
  semantic = f'semantic layer {layer}'
  tokens = {semantic: te_tok.reshape(-1),
            'log-mel': np.asarray(kmeans.assign(te_mel, mel_km.centroids))}
  features = {semantic: (tr_emb, te_emb), 'log-mel': (tr_mel, te_mel)}
  for extra in extra_layers:
    if extra != layer:
      features[f'semantic layer {extra}'] = tuple(
          e[extra].reshape(-1, e[extra].shape[-1]) for e in (tr_embs, te_embs))

  voiced_te = te_lab['pitch'] >= 0
  voiced_tr = tr_lab['pitch'][keep] >= 0
  results: dict[str, Any] = {
      'tokenizer_dir': tokenizer_dir, 'k': k, 'split': split,
      'test_clips': len(test), 'test_frames': int(len(te_emb)),
      'train_clips': len(train), 'probe_train_frames': int(len(keep)), 'rows': {}}
  for name, (tr_x, te_x) in features.items():
    tr_x = tr_x[keep]
    row = {}
    if name in tokens:
      tok = tokens[name]
      row['tokens_used'] = int(len(np.unique(tok)))
      for label in LABELS:
        mask = voiced_te if label.startswith('pitch') else np.ones_like(voiced_te)
        row[f'nmi/{label}'] = nmi(tok[mask], te_lab[label][mask])
        row[f'purity/{label}'] = purity(tok[mask], te_lab[label][mask])
    row['linear/pitch_class'] = linear_probe(
        tr_x[voiced_tr], tr_lab['pitch_class'][keep][voiced_tr], te_x[voiced_te],
        te_lab['pitch_class'][voiced_te], seed=seed)
    row['linear/timbre'] = linear_probe(tr_x, tr_lab['timbre'][keep].astype(str), te_x,
                                        te_lab['timbre'].astype(str), seed=seed)
    row['linear/onset_balanced'] = linear_probe(tr_x, tr_lab['onset'][keep], te_x,
                                                te_lab['onset'], balanced=True, seed=seed)
    results['rows'][name] = row
  results['chance'] = {
      'purity/pitch_class': majority_rate(te_lab['pitch_class'][voiced_te]),
      'purity/timbre': majority_rate(te_lab['timbre'].astype(str)),
      'linear/pitch_class': majority_rate(te_lab['pitch_class'][voiced_te]),
      'linear/timbre': majority_rate(te_lab['timbre'].astype(str)),
      'linear/onset_balanced': 0.5}
  results['seconds'] = round(time.time() - start, 1)
  return results


def markdown(results: dict[str, Any]) -> str:
  """The results as a Markdown table (one row per representation, chance last)."""
  cols = ['nmi/pitch_class', 'nmi/pitch', 'nmi/onset', 'nmi/timbre', 'purity/pitch_class',
          'purity/timbre', 'linear/pitch_class', 'linear/timbre', 'linear/onset_balanced']
  lines = ['| representation | ' + ' | '.join(cols) + ' |',
           '|---' * (len(cols) + 1) + '|']
  for name, row in results['rows'].items():
    label = f'{name} (k={results["k"]})' if 'tokens_used' in row else f'{name} (frames only)'
    lines.append(f'| {label} | ' + ' | '.join(
        f'{row[c]:.3f}' if c in row else '-' for c in cols) + ' |')
  chance = results['chance']
  lines.append('| chance / majority | ' + ' | '.join(
      f'{chance[c]:.3f}' if c in chance else '0' if c.startswith('nmi') else '-'
      for c in cols) + ' |')
  return '\n'.join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--tokenizer_dir', required=True)
  parser.add_argument('--tfds_data_dir', default=None)
  parser.add_argument('--train_examples', type=int, default=240)
  parser.add_argument('--split', default='test', help="measured split ('validation' to choose)")
  parser.add_argument('--test_examples', type=int, default=None)
  parser.add_argument('--max_train_frames', type=int, default=30000)
  parser.add_argument('--extra_layers', default='',
                      help='comma-separated encoder layers (up to the tokenizer\'s) to probe too')
  parser.add_argument('--out', default=None, help='write the results JSON here')
  args = parser.parse_args(argv)
  extra = tuple(int(x) for x in args.extra_layers.split(',') if x.strip())
  results = run_probe(args.tokenizer_dir, args.tfds_data_dir, args.train_examples,
                      args.test_examples, args.max_train_frames, extra_layers=extra,
                      split=args.split)
  print(markdown(results))
  print(f'({results["test_clips"]} {results["split"]} clips, {results["test_frames"]} frames; linear probes '
        f'trained on {results["probe_train_frames"]} frames of {results["train_clips"]} training '
        f'clips; {results["seconds"]} s)')
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(results, f, indent=2, sort_keys=True)
  return 0


if __name__ == '__main__':
  raise SystemExit(main())

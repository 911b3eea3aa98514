"""Does the text reach the stages? MuLan text against audio on the embedded corpus's clips.

MusicLM trains its stages on the MuLan tokens of the audio and samples from the MuLan tokens of
the text: the text can steer the music only as far as the two land on the same tokens. For each
MuLan conditioner folder given, on every clip of a split (default validation; 10 s each):

  matched cos      mean cosine of a caption's text embedding and its own clip's audio embedding
  R@1, R@10        text -> audio retrieval among the split's clips (chance: 1/N, 10/N)
  NN instrument    the nearest clip to a caption (by audio embedding) has the caption's clip's
                   first instrument (chance: the majority share, printed below the table)
  L1 text=audio    the caption's level-1 conditioning token equals its clip's
  L1 same instr.   ... equals that of a clip with the same instrument (averaged over clips)
  distinct L1      level-1 tokens used by the captions / by the clips

  .venv/bin/python benchmarks/mulan_alignment.py runs/tiny/mulan_conditioner [more folders]
      [--split validation]

Needs the built corpus (`musiclm-jax build_data`). Prints one Markdown table.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from musiclm_jax.common import tf_setup  # noqa: E402  pylint: disable=g-import-not-at-top

tf_setup.quiet_tensorflow()

from musiclm_jax.mulan import conditioning  # noqa: E402  pylint: disable=g-import-not-at-top
from musiclm_jax.mulan import metrics as mulan_metrics  # noqa: E402  pylint: disable=g-import-not-at-top

SAMPLES = 240_000  # 10 s at 24 kHz


def load_clips(split: str) -> tuple[list[str], np.ndarray, np.ndarray]:
  """(captions, audio float32 [N, 10 s], first instrument [N]) of embedded_music/`split`."""
  clips = mulan_metrics.read_split('embedded_music', split, SAMPLES,
                                   features=('caption', 'instruments'))
  instruments = [list(x)[0] if len(x) else '' for x in clips['instruments']]
  return list(clips['caption']), np.asarray(clips['audio'], np.float32), np.array(instruments)


def unit(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def scores(conditioner_dir: str, captions, audio, instruments) -> dict[str, float]:
  cond = conditioning.load_conditioner(conditioner_dir)
  audio_emb = np.concatenate([cond.embed_audio(audio[i:i + 16])
                              for i in range(0, len(audio), 16)])
  text_emb = np.concatenate([cond.embed_text(captions[i:i + 64])
                             for i in range(0, len(captions), 64)])
  audio_tok, text_tok = cond.quantize(audio_emb), cond.quantize(text_emb)
  sims = unit(text_emb) @ unit(audio_emb).T
  ranks = (sims > np.diag(sims)[:, None]).sum(1)
  same = [instruments == instruments[i] for i in range(len(instruments))]
  return {
      'matched cos': float(np.mean(np.diag(sims))),
      'R@1': float(np.mean(ranks < 1)),
      'R@10': float(np.mean(ranks < 10)),
      'NN instrument': float(np.mean(instruments[sims.argmax(1)] == instruments)),
      'L1 text=audio': float(np.mean(text_tok[:, 0] == audio_tok[:, 0])),
      'L1 same instr.': float(np.mean([np.mean(text_tok[i, 0] == audio_tok[s, 0])
                                       for i, s in enumerate(same)])),
      'distinct L1 text / audio': f'{len(set(text_tok[:, 0]))} / {len(set(audio_tok[:, 0]))}',
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('conditioners', nargs='+', help='MuLan conditioner folders')
  parser.add_argument('--split', default='validation')
  args = parser.parse_args()
  captions, audio, instruments = load_clips(args.split)
  rows = {d: scores(d, captions, audio, instruments) for d in args.conditioners}
  names = list(next(iter(rows.values())))
  print(f'embedded_music/{args.split}: {len(captions)} clips of 10 s\n')
  print('| conditioner | ' + ' | '.join(names) + ' |')
  print('|---|' + '---:|' * len(names))
  for d, row in rows.items():
    cells = [v if isinstance(v, str) else f'{v:.3f}' for v in row.values()]
    print(f'| {d} | ' + ' | '.join(cells) + ' |')
  shares = [np.mean(instruments == k) for k in set(instruments)]
  print(f'\nchance: R@1 {1 / len(captions):.3f}, R@10 {min(1.0, 10 / len(captions)):.3f}, '
        f'NN instrument (majority share) {max(shares):.3f}')


if __name__ == '__main__':
  main()

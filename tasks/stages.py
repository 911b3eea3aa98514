"""SeqIO stage-token tasks: each corpus's crops tokenized once by the frozen models, for all stages.

Registered on import (cache each once with `musiclm-jax tokenize`, e.g.
`--gin_file=examples/tokenize_stage_tokens_tiny_cpu.gin`):
  embedded_music_stage_tokens       embedded_music/default, whole 10 s clips (train / validation /
                                    test)
  embedded_music_tiny_stage_tokens  embedded_music/tiny, whole 4 s clips (the test-sized corpus)
  musiccaps_stage_tokens            musiccaps, whole 10 s clips (train / eval / eval_balanced)
  embedded_music_melody_stage_tokens       as embedded_music_stage_tokens, plus melody tokens
  embedded_music_tiny_melody_stage_tokens  as embedded_music_tiny_stage_tokens, plus melody tokens
Each cached example holds `semantic_tokens` [frames at 25 Hz], `codec_tokens` [frames at 50 Hz,
12 levels] and `mulan_tokens` [12] (musiclm_jax/stages/tokens.py), with `caption`, `aspects` and
`id`; the melody tasks' also hold `melody_tokens` [windows, levels] (the clip's own melody
tokens, 3 windows x 24 levels per 10 s clip in the paper; computed as the pipeline computes them
from a hummed tune), for the melody-conditioned semantic stage (MusicLM section 3.3;
TokenSizes.melody_levels / melody_codes / melody_frames as the melody conditioner gives them:
see runs/train_semantic_stage.gin). The frozen models come from `stage_token_model_dirs` (gin),
else $MUSICLM_JAX_SEMANTIC_TOKENIZER_DIR, $MUSICLM_JAX_CODEC_DIR,
$MUSICLM_JAX_MULAN_CONDITIONER_DIR and (melody tasks only) $MUSICLM_JAX_MELODY_CONDITIONER_DIR,
else runs/semantic_tokenizer_tiny, runs/codec_tiny, runs/mulan_conditioner_tiny and
runs/melody_conditioner_tiny; they are only opened when a task is cached or its cache is read.
A melody task's cache holds the same semantic, codec and MuLan tokens as its plain twin, so it
serves the coarse and fine stages too.

The stage tasks over these caches, '<tokens task>_<stage>' (e.g.
'embedded_music_stage_tokens_coarse'), are registered by the run files' `TRAIN_TASK =
@stage_task()` with the run's stage spec, or in Python with
`musiclm_jax.stages.data.register_stage_task(tokens_task, spec)`. Another corpus gets a
stage-token task from `register_stage_tokens_task(name, tfds_name, StageTokenizers(clip_seconds),
clip_seconds=...)`, with model directories as StageTokenizers' arguments if they are not the
defaults.
"""
from __future__ import annotations

# Importing a builder module registers its TFDS dataset name.
from musiclm_jax.data import embedded_music  # noqa: F401  pylint: disable=unused-import
from musiclm_jax.data import musiccaps  # noqa: F401  pylint: disable=unused-import
from musiclm_jax.stages.data import register_stage_tokens_task
from musiclm_jax.stages.tokens import StageTokenizers


def _register(task_name: str, tfds_name: str, clip_seconds: float, splits, melody: bool = False):
  return register_stage_tokens_task(task_name, tfds_name,
                                    StageTokenizers(clip_seconds, melody=melody),
                                    clip_seconds=clip_seconds, splits=splits)


_register('embedded_music_stage_tokens', 'embedded_music/default:1.1.0', 10.0,
          ('train', 'validation', 'test'))
_register('embedded_music_tiny_stage_tokens', 'embedded_music/tiny:1.1.0', 4.0,
          ('train', 'validation', 'test'))
_register('musiccaps_stage_tokens', 'musiccaps/default:1.0.0', 10.0,
          ('train', 'eval', 'eval_balanced'))
_register('embedded_music_melody_stage_tokens', 'embedded_music/default:1.1.0', 10.0,
          ('train', 'validation', 'test'), melody=True)
_register('embedded_music_tiny_melody_stage_tokens', 'embedded_music/tiny:1.1.0', 4.0,
          ('train', 'validation', 'test'), melody=True)

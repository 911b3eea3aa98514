"""A stage-token task for tests: embedded_music/tiny crops tokenized by tiny random-init models.

`test_stage_tokens`: 2 s crops -> three seeded random-projection quantizers standing in for the
frozen models (so no trained model is needed): `semantic_tokens` [50] (25 Hz, 16 codes),
`codec_tokens` [100, 3] (50 Hz, 3 levels of 32 codes) and `mulan_tokens` [1, 2] (one frame of 2
levels of 8 codes per clip). `TEST_SIZES` are the matching TokenSizes (the coarse stage takes
codec level 1, the fine stage levels 2-3).
"""
from __future__ import annotations

from musiclm_jax.data.frozen_tokenizer import FrozenTokenizer
from musiclm_jax.nn.random_projection import RandomProjectionQuantizer
from musiclm_jax.stages.data import register_stage_tokens_task
from musiclm_jax.stages.spec import TokenSizes

TASK = 'test_stage_tokens'
CLIP_SECONDS = 2.0
CLIP_SAMPLES = 48000
TEST_SIZES = TokenSizes(semantic_codes=16, codec_levels=3, codec_codes=32, coarse_levels=1,
                        mulan_levels=2, mulan_codes=8)
# The same as gin bindings (for `musiclm-jax train`).
TEST_SIZE_BINDINGS = [f'TokenSizes.{k}={v}' for k, v in vars(TEST_SIZES).items()]


def tokenizers(clip_samples: int = CLIP_SAMPLES) -> list[FrozenTokenizer]:
  """The three stand-ins (semantic, codec, MuLan tokens) for crops of `clip_samples`."""
  def rpq(feature, hop, codes, books, seed):
    return FrozenTokenizer(
        model=RandomProjectionQuantizer(frame_size=max(960, hop), hop=hop, dim=8,
                                        codebook_size=codes,
                                        num_codebooks=books),
        output_feature=feature, input_samples=clip_samples, init_seed=seed, batch_size=8)
  return [rpq('semantic_tokens', 960, 16, 1, 1), rpq('codec_tokens', 480, 32, 3, 2),
          rpq('mulan_tokens', clip_samples, 8, 2, 3)]


register_stage_tokens_task(TASK, 'embedded_music/tiny:1.1.0', tokenizers(),
                           clip_seconds=CLIP_SECONDS, splits=('train', 'validation'))

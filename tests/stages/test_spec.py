"""Stage specs: vocabulary layout, offsets, frame-major flattening, NULL prompts, vocab masks."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from musiclm_jax.stages import spec as spec_lib
from musiclm_jax.stages.spec import StageSpec, TokenSizes, TokenStream

TINY = TokenSizes(semantic_codes=5, codec_levels=3, codec_codes=4, coarse_levels=2, mulan_levels=2,
                  mulan_codes=3)


def test_paper_layouts_and_lengths():
  specs = spec_lib.stage_specs(TokenSizes())
  semantic, coarse, fine = specs['semantic'], specs['coarse'], specs['fine']
  # MuLan: 12 levels x 1024 from id 1, then its NULL id, then the stream the stage predicts.
  assert semantic.level_offsets('mulan')[[0, 11]].tolist() == [1, 1 + 11 * 1024]
  assert semantic.null_id('mulan') == 1 + 12 * 1024
  assert semantic.offset('semantic') == 12290 and semantic.vocab_size == 12290 + 1024
  assert coarse.level_offsets('coarse').tolist() == [13314 + l * 1024 for l in range(4)]
  assert coarse.vocab_size == 13314 + 4096
  assert fine.level_offsets('coarse')[0] == 1 and fine.offset('fine') == 4097
  assert fine.vocab_size == 1 + 12 * 1024 and not fine.droppable
  assert fine.target.first_level == 4 and fine.target.num_levels == 8
  # The paper's crops: 30 s, 10 s and 3 s.
  assert semantic.feature_lengths(30.0) == {'inputs': 12, 'targets': 750}
  assert coarse.feature_lengths(10.0) == {'inputs': 12 + 250, 'targets': 2000}
  assert fine.feature_lengths(3.0) == {'inputs': 600, 'targets': 1200}
  assert coarse.stream_slices(10.0) == {'mulan': slice(0, 12), 'semantic': slice(12, 262),
                                        'coarse': slice(262, 2262)}
  assert coarse.crop_unit_samples == 960 and fine.crop_unit_samples == 480
  with pytest.raises(ValueError, match='multiple of 960 samples'):
    coarse.feature_lengths(0.03)  # 720 samples: 1.5 codec frames per semantic frame
  with_melody = spec_lib.semantic_stage_spec(TokenSizes(melody_levels=24))
  assert [s.name for s in with_melody.droppable] == ['mulan', 'melody']
  assert with_melody.feature_lengths(10.0) == {'inputs': 12 + 3 * 24, 'targets': 250}


def test_overlapping_offsets_raise_naming_the_streams():
  mulan = TokenStream('mulan', 'mulan_tokens', 8, 2, frames=1, droppable=True)  # ids [1, 18)
  semantic = TokenStream('semantic', 'semantic_tokens', 10, hop_samples=960, offset=17)
  with pytest.raises(ValueError) as e:
    StageSpec('clash', (mulan,), semantic)
  message = str(e.value)
  assert "'clash'" in message and "'mulan' [1, 18)" in message and "'semantic' [17, 27)" in message
  assert 'overlap' in message
  # Touching ranges are fine; the NULL id counts as part of its stream.
  ok = StageSpec('ok', (mulan,), TokenStream('semantic', 'semantic_tokens', 10, hop_samples=960,
                                             offset=18))
  assert ok.null_id('mulan') == 17 and ok.vocab_size == 28
  with pytest.raises(ValueError, match="'semantic' starts at id 0"):
    StageSpec('zero', (), TokenStream('semantic', 'semantic_tokens', 10, hop_samples=960,
                                      offset=0))
  with pytest.raises(ValueError, match='cannot be droppable'):
    StageSpec('bad', (), TokenStream('s', 'f', 4, hop_samples=960, droppable=True))
  with pytest.raises(ValueError, match=r"names \['a'\] repeat"):
    StageSpec('twice', (TokenStream('a', 'f', 4, hop_samples=960),),
              TokenStream('a', 'g', 4, hop_samples=960))
  with pytest.raises(ValueError, match='exactly one of hop_samples'):
    TokenStream('x', 'f', 4)


def test_flatten_is_frame_major_and_unflatten_inverts_it():
  coarse = spec_lib.coarse_stage_spec(TINY)  # mulan 2x3 (+NULL), semantic 5, coarse 2x4
  assert coarse.offset('mulan') == 1 and coarse.null_id('mulan') == 7
  assert coarse.offset('semantic') == 8 and coarse.level_offsets('coarse').tolist() == [13, 17]
  mulan = np.array([[2, 0], [1, 1]])                     # [B, levels]
  semantic = np.array([[4, 0], [3, 1]])                  # [B, frames]: 2 frames = 3840 samples
  codes = np.array([[[0, 1], [2, 3], [1, 0], [3, 2]],
                    [[3, 3], [0, 0], [1, 2], [2, 1]]])   # [B, 4 frames, 2 levels]
  tokens, weights = coarse.flatten({'mulan': mulan, 'semantic': semantic, 'coarse': codes})
  assert tokens.dtype == np.int32 and tokens.shape == (2, 2 + 2 + 8)
  np.testing.assert_array_equal(tokens[0], [3, 4, 12, 8, 13, 18, 15, 20, 14, 17, 16, 19])
  np.testing.assert_array_equal(weights[0], [0] * 4 + [1] * 8)
  assert coarse.feature_lengths(2 * 960 / 24000) == {'inputs': 4, 'targets': 8}
  np.testing.assert_array_equal(coarse.unflatten_predicted(tokens[:, 4:]), codes)
  np.testing.assert_array_equal(coarse.unflatten_predicted(tokens[0, 4:]), codes[0])
  np.testing.assert_array_equal(coarse.target_levels(tokens[0]),
                                [-1] * 4 + [0, 1] * 4)
  # The same in JAX (what the sampler calls under jit).
  jtokens, jweights = coarse.flatten({'mulan': jnp.asarray(mulan), 'semantic': jnp.asarray(semantic),
                                      'coarse': jnp.asarray(codes)})
  np.testing.assert_array_equal(jtokens, tokens)
  np.testing.assert_array_equal(jweights, weights)
  np.testing.assert_array_equal(coarse.unflatten_predicted(jtokens[:, 4:]), codes)
  np.testing.assert_array_equal(coarse.flatten_prompt({'mulan': mulan, 'semantic': semantic}),
                                tokens[:, :4])
  with pytest.raises(ValueError, match=r"stream 'coarse' codes must lie in \[0, 4\)"):
    coarse.flatten({'mulan': mulan, 'semantic': semantic, 'coarse': codes + 1})
  with pytest.raises(ValueError, match=r"'mulan' codes must be \[batch, frames, 2\]"):
    coarse.flatten({'mulan': mulan[:, :1, None], 'semantic': semantic, 'coarse': codes})
  with pytest.raises(ValueError, match='outside the ranges of their levels'):
    coarse.unflatten_predicted(tokens[:, 3:11])  # shifted by one: levels misaligned
  with pytest.raises(KeyError, match="missing condition streams \\['semantic'\\]"):
    coarse.flatten({'mulan': mulan, 'coarse': codes})


def test_coarse_stage_without_mulan_conditions_on_the_semantic_tokens_only():
  coarse = spec_lib.coarse_stage_spec(TINY, mulan=False)  # semantic 5 from 1, coarse 2x4
  assert [s.name for s in coarse.conditions] == ['semantic'] and not coarse.droppable
  assert coarse.offset('semantic') == 1 and coarse.level_offsets('coarse').tolist() == [6, 10]
  semantic = np.array([[4, 0]])
  codes = np.array([[[0, 1], [2, 3], [1, 0], [3, 2]]])
  tokens, weights = coarse.flatten({'semantic': semantic, 'coarse': codes})
  np.testing.assert_array_equal(tokens[0], [5, 1, 6, 11, 8, 13, 7, 10, 9, 12])
  np.testing.assert_array_equal(weights[0], [0] * 2 + [1] * 8)
  assert coarse.feature_lengths(2 * 960 / 24000) == {'inputs': 2, 'targets': 8}
  np.testing.assert_array_equal(coarse.null_prompt(tokens), tokens)  # nothing to drop
  np.testing.assert_array_equal(coarse.unflatten_predicted(tokens[:, 2:]), codes)

def test_vocab_mask_allows_exactly_each_levels_ids():
  fine = spec_lib.fine_stage_spec(TINY)  # coarse 2x4 from 1, fine: level 2 of 3 (1 level) x 4
  coarse = spec_lib.coarse_stage_spec(TINY)
  mask = coarse.vocab_mask()
  assert mask.shape == (2, coarse.vocab_size) and mask.dtype == bool
  assert np.flatnonzero(mask[0]).tolist() == [13, 14, 15, 16]
  assert np.flatnonzero(mask[1]).tolist() == [17, 18, 19, 20]
  wide = coarse.vocab_mask(32)
  assert wide.shape == (2, 32) and not wide[:, coarse.vocab_size:].any()
  np.testing.assert_array_equal(wide[:, :coarse.vocab_size], mask)
  assert fine.period == 1 and np.flatnonzero(fine.vocab_mask()[0]).tolist() == [9, 10, 11, 12]
  # Every id a flattened target holds is allowed at its position (period = levels).
  codes = np.random.default_rng(0).integers(0, 4, (3, 5, 2))
  ids = coarse.encode_stream('coarse', codes)
  for i in range(ids.shape[1]):
    assert mask[i % coarse.period, ids[:, i]].all()


def test_null_prompt_replaces_only_droppable_streams():
  sizes = TokenSizes(semantic_codes=5, mulan_levels=2, mulan_codes=3, melody_levels=2,
                     melody_codes=4, melody_frames=2)
  spec = spec_lib.semantic_stage_spec(sizes)  # mulan [1, 7], melody [8, 16], semantic [17, 22)
  assert spec.null_id('mulan') == 7 and spec.null_id('melody') == 16
  streams = {'mulan': np.array([[0, 2]]), 'melody': np.array([[[1, 3], [0, 2]]]),
             'semantic': np.array([[1, 2, 3]])}
  tokens, _ = spec.flatten(streams)
  null = spec.null_prompt(tokens)
  np.testing.assert_array_equal(null[0, :2], [7, 7])
  np.testing.assert_array_equal(null[0, 2:6], [16] * 4)
  np.testing.assert_array_equal(null[0, 6:], tokens[0, 6:])
  # Idempotent, and the same length as the prompt it replaces.
  np.testing.assert_array_equal(spec.null_prompt(null), null)
  only_melody = spec.drop_streams(tokens, {'melody': np.array([[True]])})
  np.testing.assert_array_equal(only_melody[0, :2], tokens[0, :2])
  np.testing.assert_array_equal(only_melody[0, 2:6], [16] * 4)
  with pytest.raises(ValueError, match="'semantic' is not droppable"):
    spec.null_id('semantic')

"""The JAX musicnn against the musicnn package: its preprocessing and its original TF graph."""
import os

import numpy as np
import pytest
import soundfile as sf

from musiclm_jax.evaluation import fad_baselines
from musiclm_jax.evaluation import frechet
from musiclm_jax.evaluation import musicnn
from tests.evaluation import musicnn_tf_reference

pytest.importorskip('musicnn', reason='`pip install --no-deps musicnn==0.1.0` (make setup)')

OUTPUTS = ('tags', 'logits', 'penultimate', 'max_pool', 'mean_pool')


def loud_chord(seconds=4.0, sample_rate=24000):
  """A loud sustained chord: its mel power overflows musicnn's float16 log (x > 6.55)."""
  t = np.arange(int(seconds * sample_rate)) / sample_rate
  wave = sum(0.25 * np.sin(2 * np.pi * f * t) for f in (220.0, 277.2, 329.6))
  return (wave * np.minimum(1.0, t / 0.05)).astype(np.float32)


@pytest.fixture(scope='module')
def clips(tiny_corpus_dir):
  """Two rendered corpus clips (4 s, int16 at 24 kHz), a 7 s excerpt-pair, and the chord."""
  real = fad_baselines.read_corpus_audio('tiny', 'train', data_dir=tiny_corpus_dir, max_clips=3)
  longer = np.concatenate([real[1], real[2][:24000 * 3]])  # 7 s: two patches
  return [real[0], longer, loud_chord()]


@pytest.fixture(scope='module')
def embedder():
  return musicnn.MusicnnEmbedder(batch_size=4)


@pytest.fixture(scope='module')
def original_patches(clips, tmp_path_factory):
  """musicnn.extractor.batch_data on each clip saved as a 24 kHz wav (it resamples to 16 kHz)."""
  folder = tmp_path_factory.mktemp('musicnn_wavs')
  paths = []
  for i, clip in enumerate(clips):
    paths.append(os.path.join(folder, f'{i}.wav'))
    sf.write(paths[-1], clip, 24000, subtype='PCM_16' if clip.dtype == np.int16 else 'FLOAT')
  return musicnn_tf_reference.original_batch_data(paths)


def test_tag_names_are_the_packages():
  from musicnn import configuration  # pylint: disable=g-import-not-at-top
  assert musicnn.MTT_TAGS == tuple(configuration.MTT_LABELS)
  assert musicnn.MSD_TAGS == tuple(configuration.MSD_LABELS)
  assert musicnn.SAMPLE_RATE == configuration.SR and musicnn.N_MELS == configuration.N_MELS
  assert (musicnn.FFT_SIZE, musicnn.FFT_HOP) == (configuration.FFT_SIZE, configuration.FFT_HOP)
  import librosa  # pylint: disable=g-import-not-at-top
  assert musicnn.PATCH_FRAMES == librosa.time_to_frames(
      musicnn.PATCH_SECONDS, sr=musicnn.SAMPLE_RATE, n_fft=musicnn.FFT_SIZE,
      hop_length=musicnn.FFT_HOP) + 1


def test_preprocessing_is_musicnns_where_float16_does_not_overflow(clips, original_patches):
  for i, (clip, original) in enumerate(zip(clips, original_patches)):
    ours = musicnn.audio_patches(clip, 24000)
    assert ours.shape == original.shape, i
    assert np.isfinite(ours).all()
    finite = np.isfinite(original)
    np.testing.assert_array_equal(ours[finite], original[finite].astype(np.float32))
  # The chord does overflow musicnn's float16 arithmetic (the one place we differ).
  assert not np.isfinite(original_patches[2]).all()
  assert [p.shape[0] for p in original_patches] == [1, 2, 1]


@pytest.fixture(scope='module')
def mtt_graph():
  graph = musicnn_tf_reference.OriginalGraph('MTT_musicnn')
  yield graph
  graph.close()


def test_port_matches_the_original_tf_graph(clips, embedder, mtt_graph):
  patches = np.concatenate([musicnn.audio_patches(c) for c in clips])
  ours = embedder.patch_outputs(patches)
  theirs = mtt_graph.run(patches)
  for name in OUTPUTS:
    assert ours[name].shape == theirs[name].shape, name
    # Absolute 1e-4 for probabilities and the 200-d embedding; the pooled maps reach ~150.
    np.testing.assert_allclose(ours[name], theirs[name], atol=1e-4, rtol=1e-5, err_msg=name)
  assert ours['tags'].shape == (4, 50) and ours['penultimate'].shape == (4, 200)


def test_msd_port_matches_its_original_tf_graph(clips):
  patches = musicnn.audio_patches(clips[0])
  ours = musicnn.MusicnnEmbedder('MSD_musicnn', batch_size=1).patch_outputs(patches)
  graph = musicnn_tf_reference.OriginalGraph('MSD_musicnn')
  try:
    theirs = graph.run(patches)
  finally:
    graph.close()
  for name in OUTPUTS:
    np.testing.assert_allclose(ours[name], theirs[name], atol=1e-4, rtol=1e-5, err_msg=name)


def test_embedder_averages_patches_per_clip(clips, embedder):
  out = embedder.clip_outputs(clips)
  assert out.embeddings.shape == (3, 200) and out.tags.shape == (3, 50)
  np.testing.assert_array_equal(out.num_patches, [1, 2, 1])
  patches = embedder.patch_outputs(musicnn.audio_patches(clips[1]))
  np.testing.assert_allclose(out.embeddings[1], patches['penultimate'].mean(axis=0), atol=1e-6)
  np.testing.assert_allclose(out.tags[1], patches['tags'].mean(axis=0), atol=1e-7)
  assert ((out.tags >= 0) & (out.tags <= 1)).all()
  np.testing.assert_allclose(embedder.tags(clips[:1]), out.tags[:1], atol=1e-7)
  top = embedder.top_tags(clips[:1], k=2)[0]
  assert len(top) == 2 and top[0][0] in musicnn.MTT_TAGS and top[0][1] >= top[1][1]
  # Integer PCM and its float scaling embed alike; a 2-D [n, samples] batch works.
  as_float = clips[0].astype(np.float32) / 32768
  np.testing.assert_allclose(embedder.embed(as_float[None]), out.embeddings[:1], atol=1e-6)
  # A set of clips against itself: FAD 0 (the embeddings feed frechet.fad as they are).
  assert frechet.fad(out.embeddings, out.embeddings) == pytest.approx(0.0, abs=1e-6)


def test_embedder_errors():
  with pytest.raises(ValueError, match='shorter than one musicnn patch'):
    musicnn.audio_patches(np.zeros(24000 * 2, np.float32), 24000)
  with pytest.raises(ValueError, match='NaN/inf'):
    musicnn.audio_patches(np.full(24000 * 4, np.nan, np.float32), 24000)
  with pytest.raises(ValueError, match='feature'):
    musicnn.MusicnnEmbedder(feature='pool5', params={})
  with pytest.raises(ValueError, match='model'):
    musicnn.checkpoint_prefix('MSD_musicnn_big')
  embedder = musicnn.MusicnnEmbedder(params={})  # no weights needed to reach the input checks
  with pytest.raises(ValueError, match='wrap it in a list'):
    embedder.embed(np.zeros(24000 * 4, np.float32))
  assert musicnn.audio_patches(np.zeros(musicnn.min_input_samples(24000)), 24000).shape == (
      1, musicnn.PATCH_FRAMES, musicnn.N_MELS)

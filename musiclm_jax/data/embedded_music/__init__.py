"""The embedded default corpus: TFDS `embedded_music`, rendered offline from music21 melodies.

Importing this package registers the builder:

  import musiclm_jax.data.embedded_music  # noqa: F401
  tfds.builder('embedded_music/tiny', data_dir=...).download_and_prepare()

The pieces also work without TFDS: list_tunes / collect_melodies pick and parse melodies,
sample_render_spec / render_rendering render one, write_caption / check_consistency describe it,
melody_voice_notes gives the melody notes it sounds (the `melody_notes` feature) and
frame_pitches turns those into per-frame pitch labels.
"""
from musiclm_jax.data.embedded_music.builder import (DEFAULT, DEFAULT_WITH_ESSEN, TINY,
                                                     EmbeddedMusic, EmbeddedMusicConfig,
                                                     assign_splits, attributes_from_example,
                                                     make_example, rendering_rng)
from musiclm_jax.data.embedded_music.captions import (RenderingAttributes, check_consistency,
                                                      tempo_band, write_caption)
from musiclm_jax.data.embedded_music.melodies import (DEFAULT_COLLECTIONS, ESSEN_COLLECTION,
                                                      CorpusTune, Melody, SkipMelody,
                                                      collect_melodies, list_tunes, load_melody,
                                                      melody_from_score, selection_order)
from musiclm_jax.data.embedded_music.notes import frame_pitches
from musiclm_jax.data.embedded_music.render import (RenderSpec, attributes_of,
                                                    melody_voice_notes, render_rendering,
                                                    sample_render_spec, to_int16)

__all__ = [
    'DEFAULT', 'DEFAULT_WITH_ESSEN', 'TINY', 'EmbeddedMusic', 'EmbeddedMusicConfig',
    'assign_splits', 'attributes_from_example', 'make_example', 'rendering_rng',
    'RenderingAttributes', 'check_consistency', 'tempo_band', 'write_caption',
    'DEFAULT_COLLECTIONS', 'ESSEN_COLLECTION', 'CorpusTune', 'Melody', 'SkipMelody',
    'collect_melodies', 'list_tunes', 'load_melody', 'melody_from_score', 'selection_order',
    'frame_pitches', 'RenderSpec', 'attributes_of', 'melody_voice_notes', 'render_rendering',
    'sample_render_spec', 'to_int16',
]

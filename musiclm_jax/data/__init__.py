"""Audio corpora as TFDS builders (embedded_music, musiccaps, audio_folder), SeqIO input pipelines
and preprocessors, frozen tokenizers and token caching on Apache Beam."""

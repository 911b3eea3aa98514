"""Installs musiclm-jax: MusicLM on JAX/Flax, T5X style (gin, SeqIO, orbax, mesh sharding)."""
import setuptools

# Pinned to the versions tested together on Python 3.11 (see ../shared/DESIGN.md for why
# sentencepiece stays at 0.2.1 and protobuf below 7).
INSTALL_REQUIRES = [
    'jax[cpu]==0.10.2',
    'jaxlib==0.10.2',
    'flax==0.12.8',
    'optax==0.2.8',
    'orbax-checkpoint==0.12.8',
    'gin-config==0.5.0',
    'seqio==0.0.20',
    'tensorflow==2.21.0',
    'tensorflow-datasets==4.9.10',
    'tensorboard==2.21.0',
    'librosa==0.11.0',
    'soundfile==0.14.0',
    'numpy==2.4.6',
    'tqdm==4.70.1',
    'protobuf==6.33.6',
    'sentencepiece==0.2.1',
    'soxr==1.1.0',
    'music21==10.5.1',             # melodies of the embedded default corpus
    'pretty_midi==0.2.11.post0',   # MIDI building + the General MIDI soundfont it ships
    'matplotlib==3.11.2',          # corpus previews and plots
    'apache-beam==2.77.0',         # `musiclm-jax tokenize`: token caching as a Beam pipeline
    'safetensors==0.8.0',          # MuLan text tower weights (all-MiniLM-L6-v2), no pickle
    'tokenizers==0.23.3',          # its WordPiece tokenizer.json
]
# requirements-nodeps.txt lists what the Makefile installs after this with `pip --no-deps`:
# packages whose declared dependencies cannot or need not be installed.

setuptools.setup(
    name='musiclm-jax',
    version='0.1.0',
    description='MusicLM (text-to-music) in JAX/Flax with T5X-style gin trainers on device meshes.',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    python_requires='>=3.11',
    packages=setuptools.find_packages(include=['musiclm_jax', 'musiclm_jax.*', 'tasks', 'tasks.*']),
    # MuLan's caption vocabulary (musiclm_jax/mulan/vocabulary.py), so an install carries it.
    # musiclm_jax/pretrained/: the shipped tiny pipeline (make ship-tiny), loaded by `demo`.
    package_data={'musiclm_jax.mulan': ['assets/*.model'],
                  'musiclm_jax': ['pretrained/*/*.json', 'pretrained/*/**/*']},
    install_requires=INSTALL_REQUIRES,
    extras_require={
        # nbclient + ipykernel: tests/generate runs notebooks/sample.ipynb end to end.
        'test': ['pytest==9.2.0', 'pytest-xdist==3.8.0', 'nbclient==0.11.0', 'nbformat==5.11.1',
                 'ipykernel==7.4.0'],
    },
    entry_points={'console_scripts': ['musiclm-jax=musiclm_jax.main:console_entry']},
    license='Apache-2.0',
)

"""MuLan's from-scratch text option: a SentencePiece vocabulary trained on the corpus captions.

Beside the pretrained all-MiniLM-L6-v2 tower (text.py, WordPiece), MuLan's text tower can be a
small `BertEncoder` trained from scratch over a SentencePiece vocabulary fitted on the training
captions and aspect lists, used as a `seqio.SentencePieceVocabulary` (T5's conventions: pad 0,
EOS 1, UNK 2, no BOS). A caption is encoded as its pieces followed by EOS, truncated to L - 1
pieces + EOS and right-padded with 0 (`SentencePieceTokenizer.encode`); the mask is 1 on the
pieces and the EOS.

Training (`train_caption_vocabulary`) is deterministic: the same texts in the same order give a
byte-identical .model. The settings: BPE (on the embedded corpus, SentencePiece's unigram trainer
cannot go past 567 ids and splits frequent words such as 'this' into 'th' + 'is': at 512 ids,
68% of the captions need more than 64 tokens; BPE at 1,024 keeps every corpus word whole: 38
tokens per text with the EOS on average, 67 at most), case folding with NFKC normalisation
('nmt_nfkc_cf'), digits split one by one (tempi such as '157 BPM' reuse ten pieces), full
character coverage, and byte fallback (256 byte pieces), so no text is ever <unk>: non-ASCII
captions ('café', emoji) encode to their UTF-8 bytes and decode back exactly (case folded).
Control and format characters are dropped before training and encoding (`clean_text`).

The package ships the vocabulary of the embedded corpus's default config (train split, captions
and aspect lists; 1,024 pieces): assets/embedded_music_captions.model, made by

  .venv/bin/musiclm-jax fit_text_vocab --gin_file=runs/fit_text_vocab.gin \
    --gin.VOCABULARY_PATH="'musiclm_jax/mulan/assets/embedded_music_captions.model'" \
    --gin.OVERWRITE=True

It is the vocabulary of the tasks embedded_music_mulan_sp and embedded_music_tiny_mulan_sp
(tasks/audio.py) and of gin_configs/models/mulan/tiny_scratch_text.gin.

Typical use:

  vocab = caption_vocabulary()                       # the packaged one
  tokenizer = SentencePieceTokenizer(vocab)
  ids, mask = tokenizer.encode(['a calm piano melody'], 16)   # int32 [1, 16] each
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.resources
import io
import logging
import os
import tempfile
import unicodedata
from typing import Any, Iterable, Optional, Sequence

import gin
import numpy as np
import seqio

logger = logging.getLogger(__name__)

PACKAGED_VOCABULARY = 'embedded_music_captions.model'
DEFAULT_VOCAB_SIZE = 1024
DEFAULT_MODEL_TYPE = 'bpe'
DEFAULT_NORMALIZATION = 'nmt_nfkc_cf'
# seqio.SentencePieceVocabulary's conventions (seqio.vocabularies.PAD_ID and its docstring).
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2


# ---------------------------------------------------------------------------
# The packaged vocabulary
# ---------------------------------------------------------------------------


def packaged_vocabulary_path() -> str:
  """Path of the shipped embedded-corpus vocabulary (musiclm_jax/mulan/assets/...model)."""
  path = importlib.resources.files('musiclm_jax.mulan') / 'assets' / PACKAGED_VOCABULARY
  if not path.is_file():
    raise FileNotFoundError(
        f'{path} is missing from this install of musiclm_jax; reinstall the package (setup.py '
        f'package_data ships it) or make it again with `musiclm-jax fit_text_vocab '
        f'--gin_file=runs/fit_text_vocab.gin`')
  return os.fspath(path)


def caption_vocabulary(path: Optional[str] = None) -> seqio.SentencePieceVocabulary:
  """The SentencePiece vocabulary at `path` (default: the packaged embedded-corpus one)."""
  path = path or packaged_vocabulary_path()
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: no such SentencePiece model (make one with `musiclm-jax '
                            'fit_text_vocab --gin_file=runs/fit_text_vocab.gin`)')
  return seqio.SentencePieceVocabulary(path)


def _forget_cached_model() -> None:
  """Drops seqio's per-path model cache, so a replaced .model file is read again.

  seqio caches each loaded SentencePiece model by file path for the life of the process.
  """
  loader = getattr(getattr(seqio, 'vocabularies', None), '_load_model_internal', None)
  if hasattr(loader, 'cache_clear'):
    loader.cache_clear()
  cached_tokenizer.cache_clear()


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


def train_caption_vocabulary(texts: Iterable[str], out_path: str,
                             vocab_size: int = DEFAULT_VOCAB_SIZE, *,
                             model_type: str = DEFAULT_MODEL_TYPE,
                             normalization: str = DEFAULT_NORMALIZATION,
                             byte_fallback: bool = True,
                             overwrite: bool = False) -> seqio.SentencePieceVocabulary:
  """Trains a SentencePiece model on `texts` in memory and writes it to `out_path` atomically.

  The model has seqio's special ids (pad 0, EOS 1, UNK 2, no BOS); the rest of the settings are
  in the module docstring. Training is single-threaded and reads every text once, in order, so
  it is deterministic: the same texts give the same bytes.

  Args:
    texts: training texts (captions and joined aspect lists); blank ones are ignored.
    out_path: where to write the .model (its directory is created). The file is written to a
      temporary name beside it and renamed, so a reader never sees a partial file.
    vocab_size: number of ids, specials and (with byte_fallback) the 256 byte pieces included.
    model_type: 'bpe' or 'unigram' (SentencePiece's trainers).
    normalization: SentencePiece normalisation rule ('nmt_nfkc_cf' folds case, 'nmt_nfkc'
      keeps it).
    byte_fallback: encode characters outside the vocabulary as UTF-8 byte pieces, not <unk>.
    overwrite: replace an existing `out_path` (otherwise it is a FileExistsError).

  Returns:
    The `seqio.SentencePieceVocabulary` of the written file.

  Raises:
    FileExistsError: `out_path` exists and not `overwrite`.
    ValueError: no text, bad arguments, or a vocab_size the texts cannot fill (the message
      gives SentencePiece's bound).
    TypeError: a text that is not a str.
  """
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  if model_type not in ('bpe', 'unigram'):
    raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
  if os.path.exists(out_path) and not overwrite:
    raise FileExistsError(f'{out_path} exists; pass overwrite=True to replace it')
  if isinstance(texts, str):
    raise TypeError('texts must be an iterable of str, got a single str; wrap it in a list')
  sentences = []
  for i, text in enumerate(texts):
    if not isinstance(text, str):
      raise TypeError(f'texts[{i}] is {type(text).__name__}, not str')
    text = clean_text(text).strip()  # as SentencePieceTokenizer.encode sees it
    if text:
      sentences.append(text)
  if not sentences:
    raise ValueError(f'no non-blank text to train the vocabulary {out_path} on')
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, model_type=model_type,
        vocab_size=int(vocab_size), pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
        character_coverage=1.0, byte_fallback=bool(byte_fallback), split_digits=True,
        normalization_rule_name=normalization, hard_vocab_limit=True,
        # Determinism: one thread, every sentence read, in order.
        num_threads=1, input_sentence_size=0, shuffle_input_sentence=False,
        max_sentence_length=1 << 16, minloglevel=2)
  except RuntimeError as e:
    raise ValueError(f'SentencePiece could not train {out_path} (vocab_size={vocab_size}, '
                     f'model_type={model_type!r}, {len(sentences)} texts): {e}') from e
  proto = model.getvalue()
  processor = spm.SentencePieceProcessor(model_proto=proto)
  specials = (processor.pad_id(), processor.eos_id(), processor.unk_id(), processor.bos_id())
  if specials != (PAD_ID, EOS_ID, UNK_ID, -1):  # a SentencePiece change would break seqio
    raise ValueError(f'trained model has (pad, eos, unk, bos) ids {specials}, expected '
                     f'{(PAD_ID, EOS_ID, UNK_ID, -1)}')
  _write_atomically(out_path, proto, overwrite)
  _forget_cached_model()
  logger.info('Wrote %s: %d pieces from %d texts (%s)', out_path, processor.get_piece_size(),
              len(sentences), model_type)
  return seqio.SentencePieceVocabulary(out_path)


def _write_atomically(path: str, data: bytes, overwrite: bool) -> None:
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f'.{os.path.basename(path)}-', suffix='.tmp', dir=directory)
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    if overwrite:
      os.replace(tmp, path)
    else:
      try:
        os.link(tmp, path)  # fails, without replacing, if `path` appeared meanwhile
      except FileExistsError as e:
        raise FileExistsError(f'{path} exists; pass overwrite=True to replace it') from e
      except OSError as e:  # a file system without hard links: check, then rename
        if os.path.exists(path):
          raise FileExistsError(f'{path} exists; pass overwrite=True to replace it') from e
        os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


# ---------------------------------------------------------------------------
# Training texts
# ---------------------------------------------------------------------------


def caption_texts(task: str = 'embedded_music', split: str = 'train', *,
                  tfds_data_dir: Optional[str] = None, module: Optional[str] = 'tasks.audio',
                  include_aspects: bool = True) -> list[str]:
  """The texts a MuLan task trains on: each example's caption and its joined aspect list.

  Only the text features are decoded (not the audio). The aspect list is joined as the MuLan
  tasks join it (stripped, blanks dropped, ', ' between), so the vocabulary sees the strings
  the text tower will. Blank captions are left out.

  Args:
    task: a registered SeqIO task reading a TFDS corpus (tasks/audio.py), e.g. 'embedded_music'.
    split: a training split of its TFDS dataset ('train', 'train[:90%]'); any other split is
      refused, so that held-out captions never shape the vocabulary.
    tfds_data_dir: where the corpus was prepared (None: the task's, else TFDS's default).
    module: imported first to register the task.
    include_aspects: also return each example's joined aspect list.

  Returns:
    The texts in the dataset's order (caption, then aspects, per example).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from musiclm_jax.mulan.data import ASPECT_SEPARATOR  # pylint: disable=g-import-not-at-top
  names = [part.split('[')[0].strip() for part in split.split('+')]
  if not all(name.startswith('train') for name in names):
    raise ValueError(f'split {split!r}: a caption vocabulary is fitted on a training split only, '
                     'so that validation and test captions never shape it')
  if module:
    importlib.import_module(module)
  source = getattr(seqio.get_mixture_or_task(task), 'source', None)
  if not isinstance(source, seqio.TfdsDataSource):
    raise TypeError(f'task {task!r} does not read a TFDS dataset (source: {source})')
  name = source.tfds_dataset.name
  data_dir = tfds_data_dir or source.tfds_dataset.data_dir
  builder = tfds.builder(name, data_dir=data_dir)
  if not all(name in builder.info.splits for name in names):
    raise FileNotFoundError(
        f'{name} has no prepared split {split!r} in {builder.data_dir} (build the corpus first, '
        'e.g. `musiclm-jax build_data --gin_file=data/embedded_music.gin`, or set '
        'tfds_data_dir)')
  features = builder.info.features
  wanted = {'caption': True}
  if include_aspects and 'aspects' in features:
    wanted['aspects'] = True
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          decoders=tfds.decode.PartialDecoding(wanted))
  texts = []
  for ex in ds.as_numpy_iterator():
    caption = ex['caption'].decode('utf-8', errors='replace').strip()
    if caption:
      texts.append(caption)
    if 'aspects' in ex:
      aspects = [a.decode('utf-8', errors='replace').strip() for a in ex['aspects']]
      joined = ASPECT_SEPARATOR.join(a for a in aspects if a)
      if joined:
        texts.append(joined)
  return texts


@gin.configurable
def fit_text_vocab(vocabulary_path: str = gin.REQUIRED, task: str = 'embedded_music',
                   split: str = 'train', tfds_data_dir: Optional[str] = None,
                   vocab_size: int = DEFAULT_VOCAB_SIZE, model_type: str = DEFAULT_MODEL_TYPE,
                   include_aspects: bool = True, overwrite: bool = False) -> str:
  """`musiclm-jax fit_text_vocab`: trains the caption vocabulary of a task's training split.

  Args:
    vocabulary_path: the .model to write (refused if it exists, unless `overwrite`).
    task: the SeqIO task whose captions (and aspect lists) are read (`caption_texts`).
    split: its training split.
    tfds_data_dir: the corpus's TFDS data directory (None: the task's or TFDS's default).
    vocab_size: ids in the vocabulary (see `train_caption_vocabulary`).
    model_type: 'bpe' or 'unigram'.
    include_aspects: train on the joined aspect lists too.
    overwrite: replace an existing file.

  Returns:
    The path written.
  """
  if os.path.exists(vocabulary_path) and not overwrite:
    raise FileExistsError(f'{vocabulary_path} exists; pass --gin.OVERWRITE=True to replace it')
  texts = caption_texts(task, split, tfds_data_dir=tfds_data_dir,
                        include_aspects=include_aspects)
  logger.info('Training a %d-piece %s vocabulary on %d texts of %s/%s', vocab_size, model_type,
              len(texts), task, split)
  vocab = train_caption_vocabulary(texts, vocabulary_path, vocab_size, model_type=model_type,
                                   overwrite=overwrite)
  lengths = np.array([len(ids) for ids in vocab.tokenizer.encode(texts)]) + 1  # + EOS
  logger.info('%s: %d ids; tokens per text with EOS: mean %.1f, max %d (choose TEXT_LENGTH '
              'accordingly)', vocabulary_path, vocab.vocab_size, lengths.mean(), lengths.max())
  return vocabulary_path


# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------


def clean_text(text: str) -> str:
  """Drops control and format characters (Unicode Cc, Cf) and U+FFFD; tab and newlines -> ' '.

  BERT's tokenizer cleans text this way before WordPiece; SentencePiece's NFKC rules keep such
  characters (as byte pieces), so a caption of only control characters would not be empty.
  """
  out = []
  for ch in text:
    if ch in '\t\n\r':
      out.append(' ')
    elif ch != '\ufffd' and unicodedata.category(ch) not in ('Cc', 'Cf'):
      out.append(ch)
  return ''.join(out)


class SentencePieceTokenizer:
  """Captions -> fixed-length ids and mask with a SentencePiece vocabulary (pieces, then EOS).

  The interface of `musiclm_jax.mulan.text.WordPieceTokenizer`, so data, the conditioner and the
  metrics can use either. The processor is loaded from the file's bytes here (not from seqio's
  per-path cache), and `sha256` fingerprints them.

  Attributes:
    vocabulary: the `seqio.SentencePieceVocabulary`.
    model_proto: the serialized SentencePiece model (the .model file's bytes).
    sha256: hex digest of `model_proto`.
    vocab_size: number of ids (the text tower's word table needs this many rows).
    pad_id, eos_id, unk_id: 0, 1, 2.
  """

  def __init__(self, vocabulary: seqio.SentencePieceVocabulary | str | None = None):
    """Loads `vocabulary` (a seqio vocabulary or a .model path; default the packaged one).

    Raises:
      TypeError: for a vocabulary that is not SentencePiece.
      ValueError: for a model without seqio's special ids.
    """
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    if vocabulary is None or isinstance(vocabulary, str):
      vocabulary = caption_vocabulary(vocabulary)
    if not isinstance(vocabulary, seqio.SentencePieceVocabulary):
      raise TypeError(f'expected a seqio.SentencePieceVocabulary, got {vocabulary!r}')
    self.vocabulary = vocabulary
    path = vocabulary.sentencepiece_model_file
    with tf.io.gfile.GFile(path, 'rb') as f:
      self.model_proto = f.read()
    self.sha256 = hashlib.sha256(self.model_proto).hexdigest()
    self._processor = spm.SentencePieceProcessor(model_proto=self.model_proto)
    specials = (self._processor.pad_id(), self._processor.eos_id(), self._processor.unk_id())
    if specials != (PAD_ID, EOS_ID, UNK_ID):
      raise ValueError(f'{path}: (pad, eos, unk) ids are {specials}, seqio needs '
                       f'{(PAD_ID, EOS_ID, UNK_ID)} (train it with train_caption_vocabulary)')
    self.vocab_size = int(vocabulary.vocab_size)
    self.pad_id, self.eos_id, self.unk_id = PAD_ID, EOS_ID, UNK_ID

  @property
  def path(self) -> str:
    """The .model file this tokenizer was loaded from."""
    return self.vocabulary.sentencepiece_model_file

  def encode(self, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokenizes captions to pieces + EOS, truncated and right-padded to `max_length`.

    Control and format characters are dropped first (`clean_text`, as BERT's tokenizer does).
    A caption of more than `max_length - 1` pieces keeps its first `max_length - 1` and ends
    with EOS.

    Args:
      texts: captions (a list of str; a bare str is rejected).
      max_length: the fixed output length (at least 2).

    Returns:
      (ids, mask), both int32 [len(texts), max_length]; mask is 1 on real tokens (the EOS
      included) and 0 on padding (id 0).

    Raises:
      ValueError: for an empty or whitespace-only caption, one that normalises to nothing, or
        max_length < 2.
      TypeError: when `texts` is a str or holds a non-str.
    """
    if isinstance(texts, str):
      raise TypeError('texts must be a list of str, got a single str; wrap it in a list')
    texts = list(texts)
    if max_length < 2:
      raise ValueError(f'max_length must be at least 2 (a piece and EOS), got {max_length}')
    for i, text in enumerate(texts):
      if not isinstance(text, str):
        raise TypeError(f'texts[{i}] is {type(text).__name__}, not str')
      if not text.strip():
        raise ValueError(f'empty caption at index {i}: {text!r} (captions must have text)')
    ids = np.full((len(texts), max_length), PAD_ID, np.int32)
    mask = np.zeros((len(texts), max_length), np.int32)
    cleaned = [clean_text(text) for text in texts]
    for i, pieces in enumerate(self._processor.encode(cleaned) if texts else []):
      if not pieces:
        raise ValueError(f'empty caption at index {i} after normalisation: {texts[i]!r}')
      pieces = pieces[:max_length - 1] + [EOS_ID]
      ids[i, :len(pieces)] = pieces
      mask[i, :len(pieces)] = 1
    return ids, mask

  def decode(self, ids: Any) -> str | list[str]:
    """Maps ids back to text, dropping padding and EOS (case folded as the vocabulary folds).

    Args:
      ids: one sequence [length] or a batch [n, length] of ids.

    Returns:
      A str for one sequence, a list of str for a batch.
    """
    ids = np.asarray(ids)
    if ids.ndim not in (1, 2):
      raise ValueError(f'ids must be [length] or [n, length], got shape {ids.shape}')
    rows = [ids] if ids.ndim == 1 else list(ids)
    out = [self._processor.decode([int(i) for i in row if int(i) not in (PAD_ID, EOS_ID)])
           for row in rows]
    return out[0] if ids.ndim == 1 else out

  def id_to_token(self, token_id: int) -> Optional[str]:
    """The piece of an id (None when out of range)."""
    token_id = int(token_id)
    if not 0 <= token_id < self._processor.get_piece_size():
      return None
    return self._processor.id_to_piece(token_id)

  def token_to_id(self, token: str) -> Optional[int]:
    """The id of a piece (None when absent)."""
    token_id = self._processor.piece_to_id(token)
    return None if token_id == UNK_ID and token != self._processor.id_to_piece(UNK_ID) else token_id


@functools.lru_cache(maxsize=None)
def cached_tokenizer(model_file: str) -> SentencePieceTokenizer:
  """One `SentencePieceTokenizer` per .model path in this process (data pipelines)."""
  return SentencePieceTokenizer(model_file)

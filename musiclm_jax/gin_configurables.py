"""Imports every module that registers gin configurables, so gin files can name them."""
# pylint: disable=unused-import
from musiclm_jax.audio import features  # noqa: F401  LogMelFrontEnd
from musiclm_jax.codec import discriminators  # noqa: F401  CodecDiscriminators, ...
from musiclm_jax.codec import losses  # noqa: F401  multi_scale_mel_loss
from musiclm_jax.codec import model as codec_model  # noqa: F401  CodecModel
from musiclm_jax.codec import soundstream  # noqa: F401  SoundStream
from musiclm_jax.data import build  # noqa: F401  build_dataset
from musiclm_jax.data import frozen_tokenizer  # noqa: F401  FrozenTokenizer
from musiclm_jax.data import seqio_input  # noqa: F401  DatasetConfig
from musiclm_jax.data import token_cache  # noqa: F401  cache_tasks
from musiclm_jax.nn import random_projection  # noqa: F401  RandomProjectionQuantizer
from musiclm_jax.train import models  # noqa: F401  DecoderOnlyLM, TransformerConfig
from musiclm_jax.train import optimizers  # noqa: F401  OptimizerConfig
from musiclm_jax.train import partitioning  # noqa: F401  Partitioner, standard_logical_axis_rules
from musiclm_jax.train import trainer  # noqa: F401  train, evaluate
from musiclm_jax.semantic import model as semantic_model  # noqa: F401  W2VBertModel
from musiclm_jax.semantic import w2v_bert  # noqa: F401  W2VBert
from musiclm_jax.semantic import tokenizer as semantic_tokenizer  # noqa: F401  fit_kmeans
from musiclm_jax.mulan import text as mulan_text  # noqa: F401  BertEncoder, MiniLMTextTower
from musiclm_jax.mulan import audio as mulan_audio  # noqa: F401  ResNetAudioTower, ...
from musiclm_jax.mulan import model as mulan_model  # noqa: F401  MuLan, MuLanModel
from musiclm_jax.mulan import conditioning as mulan_conditioning  # noqa: F401  fit_conditioner, load_conditioner
from musiclm_jax.mulan import vocabulary as mulan_vocabulary  # noqa: F401  fit_text_vocab
from musiclm_jax.melody import encoder as melody_encoder  # noqa: F401  MelodyEncoder
from musiclm_jax.melody import model as melody_model  # noqa: F401  MelodyModel
from musiclm_jax.melody import conditioning as melody_conditioning  # noqa: F401  fit_melody_conditioner, load_melody_conditioner
from musiclm_jax.stages import spec as stage_spec  # noqa: F401  StageSpec, TokenSizes, *_stage_spec, stage_feature_lengths
from musiclm_jax.stages import model as stage_model  # noqa: F401  StageModel
from musiclm_jax.stages import tokens as stage_tokens  # noqa: F401  stage_token_model_dirs
from musiclm_jax.stages import data as stage_data  # noqa: F401  stage_task
from musiclm_jax.generate import pipeline as generate_pipeline  # noqa: F401  assemble_pipeline
from musiclm_jax.evaluation import pipeline_eval  # noqa: F401  evaluate_pipeline
from musiclm_jax.generate import ship  # noqa: F401  ship_pipeline
from musiclm_jax.train import recipe  # noqa: F401  Step, train_pipeline

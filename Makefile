# musiclm-jax: `make demo` sets up and runs the main job; `make test` sets up and runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
# The persistent XLA compilation cache lives outside the repository.
export MUSICLM_JAX_COMPILATION_CACHE ?= $(HOME)/.cache/musiclm_jax/xla
DEMO_DIR ?= runs/demo
# The pipeline shipped in the package (make train-tiny, then make ship-tiny).
TINY_PIPELINE ?= musiclm_jax/pretrained/tiny
TINY_ROOT ?= runs/tiny
EVAL_TINY_DIR ?= runs/eval_tiny

.PHONY: setup test demo demo-toy train-tiny ship-tiny eval-tiny clean

$(VENV)/.installed: setup.py requirements-nodeps.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest tests -q -ra

# Text to music with the shipped tiny pipeline: captions, a hummed melody and a story as wavs,
# spectrograms and an HTML page (musiclm_jax/generate/demo.py). Without a shipped pipeline it
# says so and trains the toy LM instead.
demo: setup
	@if [ -f $(TINY_PIPELINE)/pipeline.json ]; then \
	  $(PY) -m musiclm_jax.main demo --checkpoint $(TINY_PIPELINE) --out_dir $(DEMO_DIR); \
	else \
	  echo "No shipped pipeline in $(TINY_PIPELINE) (make train-tiny && make ship-tiny makes one): running the toy LM demo instead."; \
	  $(MAKE) --no-print-directory demo-toy; \
	fi

demo-toy: setup
	$(PY) -m musiclm_jax.main train \
	  --gin_file=gin_configs/examples/toy_lm.gin \
	  --gin.MODEL_DIR="'runs/demo_toy'" --gin.TRAIN_STEPS=1000
	@echo "Checkpoints: runs/demo_toy/checkpoints   TensorBoard: tensorboard --logdir runs/demo_toy"

# Every part of the tiny pipeline trained on the embedded corpus, assembled and evaluated
# (gin_configs/pipelines/tiny.gin; about 2.5 hours on 2 CPU cores; run again to resume).
train-tiny: setup
	$(PY) -m musiclm_jax.main train_pipeline --gin_file=pipelines/tiny.gin \
	  --gin.ROOT="'$(TINY_ROOT)'"

# Copy the trained pipeline into the package with its manifest (sha256s, recipe, evaluation).
ship-tiny: setup
	$(PY) -m musiclm_jax.main ship_pipeline --gin_file=runs/ship_pipeline.gin \
	  --gin.PIPELINE_DIR="'$(TINY_ROOT)/pipeline'" --gin.RECIPE_DIR="'$(TINY_ROOT)'" \
	  --gin.EVAL_DIR="'$(TINY_ROOT)/eval'" --gin.OUT_DIR="'$(TINY_PIPELINE)'" --gin.OVERWRITE=True

# The quality table of the shipped pipeline on the embedded corpus test split (README's table).
eval-tiny: setup
	$(PY) -m musiclm_jax.main build_data --gin_file=data/embedded_music.gin
	test -d runs/attribute_classifier || \
	  $(PY) -m musiclm_jax.evaluation.attributes fit --out_dir runs/attribute_classifier
	$(PY) -m musiclm_jax.main eval --gin_file=runs/eval.gin \
	  --gin.PIPELINE_DIR="'$(TINY_PIPELINE)'" --gin.EVAL_DIR="'$(EVAL_TINY_DIR)'"
	$(PY) -m musiclm_jax.evaluation.quality $(EVAL_TINY_DIR) --out $(EVAL_TINY_DIR)/quality.md

clean:
	rm -rf $(VENV) runs

# musiclm-jax: `make demo` sets up and runs the main job; `make test` sets up and runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
# The persistent XLA compilation cache lives outside the repository.
export MUSICLM_JAX_COMPILATION_CACHE ?= $(HOME)/.cache/musiclm_jax/xla
DEMO_DIR ?= runs/demo_toy

.PHONY: setup test demo clean

$(VENV)/.installed: setup.py requirements-nodeps.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest tests -q -ra

# Until the text-to-music pipeline lands, the main job is the toy LM on the embedded synthetic task.
demo: setup
	$(PY) -m musiclm_jax.main train \
	  --gin_file=gin_configs/examples/toy_lm.gin \
	  --gin.MODEL_DIR="'$(DEMO_DIR)'" --gin.TRAIN_STEPS=1000
	@echo "Checkpoints: $(DEMO_DIR)/checkpoints   TensorBoard: tensorboard --logdir $(DEMO_DIR)"

clean:
	rm -rf $(VENV) runs

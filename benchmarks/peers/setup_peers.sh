#!/usr/bin/env bash
# Builds the PyTorch peers' venv for benchmarks/peers.py, apart from the project's own.
#
#   bash benchmarks/peers/setup_peers.sh [VENV]     # default ~/.cache/musiclm_jax/peers-venv
#
# Pinned: torch 2.13.0 (the CPU build; never a bare `torch`, which resolves to a multi-GB CUDA
# build), audiolm-pytorch 2.4.0, encodec 0.1.1, torchaudio 2.11.0. audiolm-pytorch and encodec
# go in with --no-deps (their declared needs include fairseq and wandb, which the benchmarks do
# not use; fairseq is stubbed in benchmarks/peers/_compat.py), then audiolm's pure-Python needs.
# PyPI's torchaudio is a CUDA build whose C++ extension does not load beside the CPU torch: its
# lib/*.so files are moved aside so it runs in pure-Python mode (the benchmarks use none of it).
# None of this belongs in the project's setup.py.
set -euo pipefail

VENV="${1:-${PEERS_VENV:-$HOME/.cache/musiclm_jax/peers-venv}}"
PY="${PYTHON:-python3}"

if [[ ! -x "$VENV/bin/python" ]]; then
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check)
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
echo 'torch==2.13.0' > "$CONSTRAINTS"

# torch: the CPU wheel where the machine keeps one (/opt/wheels), else PyTorch's CPU index.
if ls /opt/wheels/torch-2.13.0+cpu-*.whl >/dev/null 2>&1; then
  "${PIP[@]}" --find-links /opt/wheels 'torch==2.13.0'
else
  "${PIP[@]}" --index-url https://download.pytorch.org/whl/cpu 'torch==2.13.0'
fi

"${PIP[@]}" --no-deps 'audiolm-pytorch==2.4.0' 'encodec==0.1.1' 'torchaudio==2.11.0'
"${PIP[@]}" -c "$CONSTRAINTS" \
  'numpy<3' 'einops>=0.7.0' 'beartype>=0.16.1' 'ema-pytorch>=0.2.2' \
  'gateloop-transformer>=0.2.3' 'hyper-connections>=0.1.8' 'local-attention>=1.9.0' \
  'vector-quantize-pytorch>=1.19.3' 'accelerate>=0.24.0' scikit-learn sentencepiece \
  transformers joblib pytorch-warmup tqdm packaging

# torchaudio's CUDA extension aside (see above).
TA_LIB="$("$VENV/bin/python" - <<'PY'
import importlib.util, os
spec = importlib.util.find_spec('torchaudio')
print(os.path.join(os.path.dirname(spec.origin), 'lib'))
PY
)"
if compgen -G "$TA_LIB/*.so" >/dev/null; then
  mkdir -p "$TA_LIB/disabled"
  mv "$TA_LIB"/*.so "$TA_LIB/disabled/"
fi

"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
for name in ('torch', 'audiolm-pytorch', 'encodec', 'torchaudio', 'vector-quantize-pytorch',
             'transformers'):
  print(f'{name}=={md.version(name)}')
PY
echo "peers venv ready: $VENV"

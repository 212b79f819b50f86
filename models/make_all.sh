#!/usr/bin/env bash
# Regenerate every committed test model (models/*.onnx) and the embedded default
# model + samples (onnxopt/data/digits_resnet.onnx, onnxopt/data/digits_samples.npz).
#
# Two separate virtual environments are used (TensorFlow's numpy/protobuf pins
# would fight with torch/onnxscript otherwise). Create them once:
#
#   python3 -m venv /work/venv-export
#   /work/venv-export/bin/pip install torch==2.13.0 onnx onnxscript==0.7.2 onnxruntime scikit-learn numpy
#     (torch==2.13.0 exactly: it resolves to the local CPU wheel; versions used:
#      onnx 1.23.2, onnxruntime 1.32.0, onnx-ir 1.1.0, scikit-learn 1.9.1, numpy 2.4.6)
#
#   python3 -m venv /work/venv-tf
#   /work/venv-tf/bin/pip install tensorflow-cpu tf2onnx onnxruntime tf-keras==2.21.0
#     (versions used: tensorflow-cpu 2.21.0, tf-keras 2.21.0, tf2onnx 1.17.0,
#      onnx 1.23.2, onnxruntime 1.32.0; tf-keras is needed because tf2onnx 1.17's
#      from_keras does not work with Keras 3, see export_keras.py)
#
# Override the interpreters with EXPORT_PY=... TF_PY=... if the venvs live elsewhere.
# Usage (from anywhere):  bash models/make_all.sh
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
EXPORT_PY="${EXPORT_PY:-/work/venv-export/bin/python}"
TF_PY="${TF_PY:-/work/venv-tf/bin/python}"

echo "== export_torch.py (TorchScript + dynamo exporters)"
"$EXPORT_PY" "$HERE/export_torch.py"

echo "== export_transfer.py (models for onnxopt transfer)"
"$EXPORT_PY" "$HERE/export_transfer.py"

echo "== export_prune.py (models for prune-channels)"
"$EXPORT_PY" "$HERE/export_prune.py"

echo "== export_silu.py (a YOLO-style SiLU detector for int8 of SiLU networks)"
"$EXPORT_PY" "$HERE/export_silu.py"

echo "== train_default.py (embedded default model, a few minutes on CPU)"
"$EXPORT_PY" "$HERE/train_default.py"

echo "== export_keras.py (tf2onnx)"
TF_USE_LEGACY_KERAS=1 TF_CPP_MIN_LOG_LEVEL=2 "$TF_PY" "$HERE/export_keras.py"

echo "== done"

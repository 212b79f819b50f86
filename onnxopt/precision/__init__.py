"""precision/: fp16/bf16 decisions: which nodes go to half and why.

Layer: a stage; may import onnxopt.io, onnxopt.measure, onnxopt.errors (and onnxopt.inputs and
onnxopt.calib, below them), never api/cli/pipeline.
"""

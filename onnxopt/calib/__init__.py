"""Calibration stage: real data in, statistics of the model's tensors out, in bounded memory.

`sources` reads `--calib DATA` one batch at a time (.npz, folders of .npy/.npz, image folders
with `images`' preprocessing, or announced random data); `activations` runs the model and
hands out the requested intermediate tensors batch by batch; `histogram` reduces them into
fixed-size statistics. The int8, sparsity and mixed-precision stages all calibrate through it.

Layer: above onnxopt.measure (it runs models); may import measure, inputs, io and errors,
never passes, pipeline, another stage, api or cli.
"""

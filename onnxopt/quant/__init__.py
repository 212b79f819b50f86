"""Quantization stage: `--int8`, from calibration data to a verified, faster int8 model.

`int8` is the flow (prepare, calibrate, quantize, judge, fall back, time); `prepare` readies the
model and splits the data; `options` holds Int8Options / Int8Result; `budget` is the accuracy
budget and the search that sends the worst layers back to float; `dynamic` is calibration-free
int8 with its SmoothQuant and outlier-split variants (`smoothing`); `bias_correction` removes
the mean output shift that rounding the weights causes. The rewrites themselves are passes
(quantize-int8, quantize-dynamic, equalize-cross-layer, smooth-activations, split-outliers).

Layer: a stage, above pipeline; may import pipeline, onnxopt.passes, onnxopt.calib,
onnxopt.measure, inputs, io and errors; never another stage, report, api or cli.
"""

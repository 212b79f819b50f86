"""Measure stage: running models in ONNX Runtime and saying what happened.

`runtime` opens sessions (providers, options, spinning off) and runs them; `verify` compares a
rewrite with its original output by output; `validation` is `onnxopt validate` (models and
providers); `bench`, `bench_models`, `placement` and `memprobe` are `onnxopt bench` (interleaved
timing, which provider ran each node, peak memory in a fresh process); `stats` is
`onnxopt inspect` (ops, parameters, bytes, MACs).

Layer: just above inputs, io and errors, which are all it may import; everything else
(passes, pipeline, the other stages, api, cli) may import it.
"""

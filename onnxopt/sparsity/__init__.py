"""Sparsity stage: `--sparsity`, from a dense model to a pruned one that holds the budget.

`prune` is the flow (magnitude pruning by the prune-weights pass, re-fitting by `refit`, the
accuracy budget, the best model kept); `channels` does the same for whole channels (the
prune-channels pass, least-squares re-fit of the layers that read them, a bisected MAC target);
`hessian` reduces a layer's inputs batch by batch into XᵀX, `reconstruct` holds the solvers
(SparseGPT, least squares); `sensitivity` is `onnxopt sensitivity`; `summary` is the report's
section (zeros, MACs, bytes raw and compressed, verdict); `options` the option and result types.

Layer: a stage, above pipeline; may import pipeline, onnxopt.passes, onnxopt.calib,
onnxopt.measure, inputs, io and errors; never another stage, report, api or cli.
"""

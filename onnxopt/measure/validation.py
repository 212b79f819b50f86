"""`onnxopt validate`: one model against another, or one model across providers.

The reference is model A on the first provider. With B, B runs on every provider and is compared
with it; without B, A itself runs on the other providers (CPU vs CUDA). Each comparison gets a
tolerance that fits what the candidate computes, unless the user gives one. CUDA runs fp32
exactly here (use_tf32 off, see runtime.provider_options); a provider that did not register is
named, and each comparison is labelled with the provider that really ran.
    fp32, same provider:     |a - b| <= 1e-5 + 1e-4 |a|      (an exact rewrite reorders sums)
    fp32, another provider:  |a - b| <= 1e-4 + 1e-3 |a|, cosine >= 0.9999   (other kernels)
    fp16 weights or inputs:  |a - b| <= 1e-3 + 1e-2 |a|, cosine >= 0.999
    int8 (Q/DQ or integer ops): no elementwise bound; cosine >= 0.99
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence

import onnx_ir as ir

from onnxopt import inputs, io
from onnxopt.errors import BadInputError
from onnxopt.measure import verify as verify_mod
from onnxopt.measure.verify import Tolerance, Verification

__all__ = ["Comparison", "precision_of", "tolerance_for", "validate_providers"]

_INT8_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv",
             "QLinearMatMul", "MatMulInteger", "ConvInteger", "QGemm"}
_PROFILES = {
    ("fp32", True): Tolerance(1e-4, 1e-5),
    ("fp32", False): Tolerance(1e-3, 1e-4, min_cosine=0.9999),
    ("fp16", True): Tolerance(1e-2, 1e-3, min_cosine=0.999),
    ("fp16", False): Tolerance(1e-2, 1e-3, min_cosine=0.999),
    ("int8", True): Tolerance(elementwise=False, min_cosine=0.99),
    ("int8", False): Tolerance(elementwise=False, min_cosine=0.99),
}


@dataclasses.dataclass
class Comparison:
    candidate: str  # the model file
    ep: str
    reference_ep: str
    precision: str  # fp32, fp16 or int8: what the tolerance was chosen for
    tolerance: Tolerance
    verification: Verification
    notes: list[str] = dataclasses.field(default_factory=list)  # providers that did not register


def precision_of(model: ir.Model) -> str:
    """int8 if the model quantizes, fp16 if it holds fp16 weights or inputs, else fp32."""
    ops = {node.op_type for graph in model.graphs() for node in graph}
    if ops & _INT8_OPS:
        return "int8"
    float16 = ir.DataType.FLOAT16
    if any(t.dtype == float16 for t in io.iter_tensors(model)) or any(
        v.dtype == float16 for v in model.graph.inputs
    ):
        return "fp16"
    return "fp32"


def tolerance_for(model: ir.Model, *, same_provider: bool) -> tuple[str, Tolerance]:
    precision = precision_of(model)
    return precision, _PROFILES[(precision, same_provider)]


def validate_providers(
    a: str | os.PathLike,
    b: str | os.PathLike | None = None,
    *,
    eps: Sequence[str] = ("cpu",),
    inputs_file: str | None = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
    batches: int = 3,
    seed: int = 0,
    tolerance: Tolerance | None = None,
    ort_optimize: bool = False,
) -> list[Comparison]:
    """Every (candidate, provider) against A on eps[0]; `tolerance` None = by precision.

    The reference always runs with ORT's graph optimizations off (the graph as written);
    `ort_optimize` runs the candidates with them on, as they are deployed, which also checks
    ORT's own fusions. With one model and one provider that is the only comparison made."""
    if not eps:
        raise BadInputError("--ep: name at least one provider")
    model_a = io.load(a)
    model_b = io.load(b) if b is not None else None
    if model_b is not None:
        names_a = sorted(s.name for s in inputs.input_specs(model_a))
        names_b = sorted(s.name for s in inputs.input_specs(model_b))
        if names_a != names_b:
            raise BadInputError(f"{b}: inputs {names_b} differ from {a}'s {names_a}")
    elif len(eps) < 2 and not ort_optimize:
        raise BadInputError("validate with one model compares providers (--ep cpu,cuda) or ORT's "
                            "optimized graph with the raw one (--ort-optimize); or give a second "
                            "model")
    if inputs_file:
        feeds = inputs.load_npz(inputs_file, model_a)
    else:
        feeds = inputs.generate(model_a, shapes=shapes, batches=batches, seed=seed)
    reference, reference_ep, reference_note = verify_mod.provider_outputs(model_a, feeds,
                                                                        ep=eps[0])
    if model_b is not None:
        candidates = [(b, model_b, ep) for ep in eps]
    else:
        candidates = [(a, model_a, ep) for ep in (eps if ort_optimize else eps[1:])]
    comparisons = []
    for path, model, ep in candidates:
        precision, profile = tolerance_for(model, same_provider=ep == eps[0])
        chosen = tolerance or profile
        result = verify_mod.verify(model, reference, feeds, chosen, ep=ep,
                                   optimize=ort_optimize)
        notes = [n for n in (reference_note, result.note) if n]
        comparisons.append(Comparison(str(path), result.ran_on or ep, reference_ep, precision,
                                      chosen, result, notes))
    return comparisons

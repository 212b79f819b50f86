"""fuse-activations: hard-swish and hard-sigmoid written out as elementwise ops become one op.

Paddle, TensorFlow and older PyTorch exports spell MobileNetV3's activations out:
    hard-swish    x · Clip(x + 3, 0, 6) / 6    (Add, Clip, Mul, Div: four passes over memory)
    hard-sigmoid  Clip(x + 3, 0, 6) / 6        (the ÷6 may be a Mul by 1/6)
ORT runs each of those ops as its own kernel, in float even inside an int8 graph (it has no
integer kernel for them). One HardSwish (opset >= 14), or x · HardSigmoid(x) before opset 14,
reads the tensor once: 1.6 ms -> 1.0 ms on a [1, 32, 160, 160] tensor here, and PP-OCR det has
24 of them. Matching and replacing is onnxscript's rewriter, with our rules (÷6 or ×1/6, and
opsets without HardSwish) plus its HardSigmoid · x -> HardSwish; they fire only when the
intermediate values feed nothing else, and only on float32/float16 tensors (ORT's CPU
provider has no float64 HardSigmoid/HardSwish). The result differs from the spelled-out
form by float rounding (HardSigmoid computes x/6 + 0.5 where the export computed (x + 3)/6),
within the pipeline's tolerance.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common
from onnxopt.passes._graph import constant, opset_version
from onnxopt.passes._qdq import infer_dtypes
from onnxopt.passes._report import PassReport

__all__ = ["FuseActivationsPass"]

_FUSED = ("HardSwish", "HardSigmoid")


class FuseActivationsPass(ir.passes.InPlacePass):
    """Fuse spelled-out hard-swish / hard-sigmoid (Add, Clip, Mul, Div) into one op."""

    name = "fuse-activations"
    lossy = False

    def call(self, model: ir.Model) -> PassReport:
        report = PassReport(model, modified=False)
        # Clip takes its bounds as inputs from opset 11; before that the patterns never match.
        opset = opset_version(model.graph)
        if opset < 11 or not _candidates(model.graph, opset):
            return report
        before = {id(n) for n in model.graph}
        dtypes = infer_dtypes(model)  # exports often leave intermediate types out
        count = _rules(hardswish=opset >= 14, dtypes=dtypes).apply_to_model(model)
        if not count:
            return report
        common.RemoveUnusedNodesPass()(model)  # the 3 and 6 constants the rewriter left behind
        fused = [n for n in model.graph if id(n) not in before and n.op_type in _FUSED]
        for node in fused:
            report.change(f"{node.op_type} fused",
                          f"fused the spelled-out {node.op_type} of {node.inputs[0].name!r}")
        removed = len(before) - sum(1 for n in model.graph if id(n) in before)
        report.log.append(f"{removed} elementwise nodes replaced by {len(fused)}")
        report.modified = True
        return report


def _candidates(graph: ir.Graph, opset: int) -> bool:
    """onnxscript takes most of a second to import: only when a Clip is there to fuse, or a
    HardSigmoid that x * HardSigmoid(x) may turn into HardSwish."""
    wanted = ("Clip", "HardSigmoid") if opset >= 14 else ("Clip",)
    return any(node.op_type in wanted for node in graph)


def _near(value: ir.Value | None, target: float) -> bool:
    data = constant(value)
    return data is not None and data.size == 1 and bool(np.isclose(float(data.reshape(())),
                                                                    target, rtol=1e-4))


_KERNEL_DTYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16)  # what ORT CPU implements


def _rules(*, hardswish: bool, dtypes):
    from onnxscript.rewriter import pattern
    from onnxscript.rewriter._basics import MatchResult
    from onnxscript.rewriter.rules.common import _fuse_hardswish as library

    class Relu6OfXPlus3(pattern.RewriteRuleClassBase):
        """The check all four rules share: Clip(x + 3, 0, 6), then ÷6 (or ×1/6), on a dtype
        ORT's CPU provider has the fused kernel for."""

        scale = 6.0  # what the last op divides by (Div) or multiplies by (Mul: 1/6)

        def check(self, op, x, bias, clip_min, clip_max, six) -> MatchResult:
            result = MatchResult()
            if not (_near(bias, 3.0) and _near(clip_min, 0.0) and _near(clip_max, 6.0)):
                return result.fail("not Clip(x + 3, 0, 6)")
            if not _near(six, self.scale):
                return result.fail(f"not scaled by {self.scale:g}")
            if dtypes.get(x.name, x.dtype) not in _KERNEL_DTYPES:
                return result.fail("not float32/float16")
            return result

    class HardSwishDivided(Relu6OfXPlus3):
        """x · Clip(x + 3, 0, 6) / 6."""

        def pattern(self, op, x, bias, clip_min, clip_max, six):
            return op.Div(op.Mul(op.Clip(op.Add(x, bias), clip_min, clip_max), x), six)

        def rewrite(self, op, x, bias, clip_min, clip_max, six):
            if hardswish:
                return op.HardSwish(x)
            return op.Mul(x, op.HardSigmoid(x, alpha=1 / 6, beta=0.5))

    class HardSwishScaled(HardSwishDivided):
        """x · Clip(x + 3, 0, 6) · (1/6)."""

        scale = 1 / 6

        def pattern(self, op, x, bias, clip_min, clip_max, six):
            return op.Mul(op.Mul(op.Clip(op.Add(x, bias), clip_min, clip_max), x), six)

    class HardSigmoidDivided(Relu6OfXPlus3):
        """Clip(x + 3, 0, 6) / 6."""

        def pattern(self, op, x, bias, clip_min, clip_max, six):
            return op.Div(op.Clip(op.Add(x, bias), clip_min, clip_max), six)

        def rewrite(self, op, x, bias, clip_min, clip_max, six):
            return op.HardSigmoid(x, alpha=1 / 6, beta=0.5)

    class HardSigmoidScaled(HardSigmoidDivided):
        """Clip(x + 3, 0, 6) · (1/6)."""

        scale = 1 / 6

        def pattern(self, op, x, bias, clip_min, clip_max, six):
            return op.Mul(op.Clip(op.Add(x, bias), clip_min, clip_max), six)

    rules = [HardSwishDivided().rule(), HardSwishScaled().rule(),
             HardSigmoidDivided().rule(), HardSigmoidScaled().rule()]
    if hardswish:  # x · HardSigmoid(x), from the hard-sigmoid rules or from the export
        rules.append(library.HardSwishFusionFromHardSigmoid().rule())
    return pattern.RewriteRuleSet(rules, commute=True)

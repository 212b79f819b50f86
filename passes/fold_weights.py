"""fold-weights: every layer weight computed from constants becomes an initializer.

The int8 and sparsity stages read the weights of every Conv / ConvTranspose / Gemm / MatMul
(and BN's parameters); a weight written as a ConstantOfShape, or a Cast / Reshape / Transpose /
Expand of an initializer, is folded here, bounded by the weight's own size (passes/_weights.py).
`optimize` adds this pass when `--int8` or `--sparsity` asks for it; the exact pipeline alone
does not, so a file keeps its computed weights unless a stage needs their values
(fold-batchnorm folds the ones it folds into itself).
"""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common
from onnxopt.passes._report import PassReport
from onnxopt.passes._weights import WEIGHT_SLOTS, fold_weights

__all__ = ["FoldWeightsPass"]


class FoldWeightsPass(ir.passes.InPlacePass):
    """Fold layer weights computed from constants (ConstantOfShape, Cast, Reshape...) into initializers."""

    name = "fold-weights"
    lossy = False

    def call(self, model: ir.Model) -> PassReport:
        report = PassReport(model, modified=False)
        for graph in model.graphs():
            layers = [n for n in graph if n.op_type in WEIGHT_SLOTS]
            folded = fold_weights(graph, layers)
            if folded:
                report.change("folded", f"{len(folded)} weights computed from constants became "
                              f"initializers (first: {folded[0]!r})", len(folded))
        if report.modified:
            common.RemoveUnusedNodesPass()(model)
        return report

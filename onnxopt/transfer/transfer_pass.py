"""transfer: the weights of another model (SRC) into this one, for `optimize --transfer-from`.

The matching, the BatchNormalization folds and the verification against SRC are
onnxopt.transfer.apply's (`onnxopt transfer SRC DST` is the same job on its own); this pass is
its face in the pipeline. It lives in the transfer stage rather than in passes/ because the
stage runs fold-batchnorm on SRC: here, every import points down the stack. Because it changes
the model's function on purpose, it is marked `changes_function`: the optimize API runs it
first, and the passes after it are verified against its result, not against the model as
loaded.

Refused (logged, tensor unchanged): a DST tensor whose SRC candidate has another dtype or an
incompatible shape, or that names and structure cannot settle (give --map). Raises when nothing
at all matches, or when no SRC model was given.
"""

from __future__ import annotations

import logging

import onnx_ir as ir

from onnxopt import io
from onnxopt.errors import BadInputError
from onnxopt.passes import PassReport
from onnxopt.transfer import apply
from onnxopt.transfer.apply import TransferOptions

__all__ = ["TransferPass"]

logger = logging.getLogger(__name__)


class TransferPass(ir.passes.InPlacePass):
    """Copy trained weights from another export of the model (by name, then by structure)."""

    name = "transfer"
    lossy = True
    changes_function = True  # the result is the new reference: verify later passes against it

    def __init__(self, source: str | None = None, options: TransferOptions | None = None):
        super().__init__()
        self.source = source  # the model whose weights move in (--transfer-from)
        self.options = options

    def call(self, model: ir.Model) -> PassReport:
        if not self.source:
            raise BadInputError("transfer: no source model; use optimize --transfer-from SRC.onnx")
        result = apply.transfer_into(io.load(self.source), model, self.options)
        report = PassReport(model, modified=bool(result.transferred))
        report.log += apply.log_lines(result)
        report.log += apply.summary_lines(result)
        report.counts.update(apply.rule_counts(result))
        return report

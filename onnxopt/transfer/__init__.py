"""Transfer stage: trained weights from one export of a model (SRC) into another (DST).

    model, report = onnxopt.transfer.transfer("trained.onnx", "new_export.onnx", "out.onnx")

`match` decides which SRC tensor feeds which DST tensor (names, then structure); `apply` folds
SRC's BatchNormalizations when DST has them folded, writes the values and verifies DST against
SRC; `transfer_pass` is the same job as a pipeline pass (`optimize --transfer-from`).

Layer: a stage, above pipeline (it runs fold-batchnorm on SRC); may import pipeline,
onnxopt.passes, onnxopt.measure, inputs, io and errors; never another stage, report, api or cli.
"""

from __future__ import annotations

from onnxopt.transfer.apply import (
    RULES,
    SCHEMA,
    Tensor,
    TransferOptions,
    TransferReport,
    load_map,
    log_lines,
    rule_counts,
    summary_lines,
    transfer,
    transfer_into,
)
from onnxopt.transfer.transfer_pass import TransferPass

__all__ = ["RULES", "SCHEMA", "Tensor", "TransferOptions", "TransferPass", "TransferReport",
           "load_map", "log_lines", "rule_counts", "summary_lines", "transfer", "transfer_into"]

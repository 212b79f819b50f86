"""The pipeline verifies rewrites and reverts the exact pass that breaks the model."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from helpers import bn_node, bn_params, make_model, op_count, tensor, to_ir, value_info
from onnx import helper
from onnxopt.passes import CleanupPass, FoldBatchNormPass, PassReport

from onnxopt import inputs, pipeline
from onnxopt.measure import verify


class BreakWeightsPass(ir.passes.InPlacePass):
    """Claims to be exact but adds 0.5 to the Conv weight: the checker must catch it."""

    name = "break-weights"
    lossy = False

    def call(self, model):
        conv = next(n for n in model.graph if n.op_type == "Conv")
        weight = conv.inputs[1]
        broken = ir.Value(name="W_broken", const_value=ir.tensor(weight.const_value.numpy() + 0.5,
                                                                 name="W_broken"))
        model.graph.register_initializer(broken)
        conv.replace_input_with(1, broken)
        report = PassReport(model, modified=False)
        report.change("broken", "added 0.5 to the Conv weight")
        return report


class CrashPass(ir.passes.InPlacePass):
    """Damages the graph in place, then dies: only a snapshot from before it can undo that."""

    name = "crash"
    lossy = False

    def call(self, model):
        model.graph.remove(next(iter(model.graph)), safe=False)
        raise RuntimeError("boom")


def conv_bn_model():
    rng = np.random.default_rng(0)
    inits = [tensor("W", rng.standard_normal((4, 3, 3, 3))), *bn_params("bn", 4, rng)]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"), bn_node("bn", "c", "y")]
    return to_ir(make_model(nodes, [value_info("x", [1, 3, 6, 6])], [value_info("y", [1, 4, 4, 4])],
                            inits))


def checker_for(model):
    feeds = inputs.generate(model, batches=2)
    return pipeline.Checker(feeds, verify.reference_outputs(model, feeds))


@pytest.mark.parametrize("verify_each", [True, False])
def test_broken_exact_pass_is_reverted_and_the_rest_kept(verify_each):
    model = conv_bn_model()
    checker = checker_for(model)
    passes = [BreakWeightsPass(), CleanupPass(), FoldBatchNormPass()]
    result, runs, verification = pipeline.run_pipeline(model, passes, checker=checker,
                                                       verify_each=verify_each)
    assert [r.reverted for r in runs] == [True, False, False]
    assert "max abs" in runs[0].reason
    assert op_count(result, "BatchNormalization") == 0  # the good pass still applied
    assert verification.passed
    assert verify.verify(result, checker.reference, checker.feeds).passed


@pytest.mark.parametrize("verify_each,check", [(True, True), (False, True), (False, False)])
def test_crashing_pass_is_reverted_with_its_root_cause(verify_each, check):
    """Also on the fast path (one check at the end) and with no checker at all: the run starts
    again from the untouched model with a snapshot per pass."""
    model = conv_bn_model()
    checker = checker_for(model) if check else None
    result, runs, verification = pipeline.run_pipeline(
        model, [FoldBatchNormPass(), CrashPass(), CleanupPass()], checker=checker,
        verify_each=verify_each)
    assert [r.name for r in runs] == ["fold-batchnorm", "crash", "cleanup"]
    assert runs[1].reverted and "RuntimeError: boom" in runs[1].reason
    assert op_count(result, "BatchNormalization") == 0 and op_count(result, "Conv") == 1
    assert verification is None if not check else verification.passed


def test_without_a_checker_passes_just_run():
    model = conv_bn_model()
    result, runs, verification = pipeline.run_pipeline(model, [FoldBatchNormPass()], checker=None)
    assert verification is None and runs[0].modified
    assert op_count(result, "BatchNormalization") == 0


def test_verification_metrics():
    ref = [{"y": np.array([1.0, 2.0, 3.0], dtype=np.float32)}]
    close = [{"y": np.array([1.0, 2.0, 3.0001], dtype=np.float32)}]
    far = [{"y": np.array([1.0, 2.0, 4.0], dtype=np.float32)}]
    [ok] = verify.compare(ref, close)
    [bad] = verify.compare(ref, far)
    assert ok.is_close and ok.max_abs == pytest.approx(1e-4, rel=1e-2)
    assert not bad.is_close and bad.max_abs == pytest.approx(1.0)
    assert bad.cosine == pytest.approx(17 / np.sqrt(14 * 21))
    assert bad.sqnr_db == pytest.approx(10 * np.log10(14.0))
    [shape] = verify.compare(ref, [{"y": np.zeros(2, dtype=np.float32)}])
    assert not shape.is_close and "shape" in shape.reason


def test_opset_is_upgraded_only_when_a_pass_needs_it(tmp_path, monkeypatch):
    import onnx

    import onnxopt
    from onnxopt import api

    class NeedsOpset13(ir.passes.InPlacePass):
        """Does nothing, but needs opset 13 (as per-channel QDQ will)."""

        name = "needs-13"
        lossy = False
        min_opset = 13

        def call(self, model):
            return PassReport(model, modified=False)

    monkeypatch.setitem(api.REGISTRY, "needs-13", NeedsOpset13)
    model = conv_bn_model()
    model.opset_imports[""] = 11
    src = tmp_path / "in.onnx"
    ir.save(model, src)
    out = tmp_path / "out.onnx"
    _, report = onnxopt.optimize(src, out, onnxopt.OptimizeOptions(bench=()))
    assert onnx.load(str(out)).opset_import[0].version == 11  # the default passes need nothing
    assert not any("upgraded opset" in n for n in report.notes)
    options = onnxopt.OptimizeOptions(passes=("needs-13", "fold-batchnorm"), bench=())
    _, report = onnxopt.optimize(src, out, options)
    assert onnx.load(str(out)).opset_import[0].version == 13
    assert "upgraded opset 11 -> 13 with onnx's version converter (pass 'needs-13' needs it)" in report.notes
    assert report.verification.passed


def test_a_rewrite_that_runs_slower_is_not_kept(tmp_path, monkeypatch):
    import onnx

    import onnxopt
    from onnxopt import api
    from onnxopt.measure import bench

    def fake_measure(runners, **kwargs):  # the rewrite takes twice as long
        rng = np.random.default_rng(0)
        times = [list(rng.normal(1.0, 0.01, 50)), list(rng.normal(2.0, 0.01, 50))]
        return [bench.summarize("cpu", t) for t in times]

    monkeypatch.setattr(api.bench, "measure_runners", fake_measure)
    src = tmp_path / "in.onnx"
    ir.save(conv_bn_model(), src)
    out = tmp_path / "out.onnx"
    _, report = onnxopt.optimize(src, out)
    assert report.latency[0].is_slower
    assert any("kept the original model" in n for n in report.notes)
    assert op_count(onnx.load(str(out)), "BatchNormalization") == 1
    _, report = onnxopt.optimize(src, out, onnxopt.OptimizeOptions(allow_slower=True))
    assert op_count(onnx.load(str(out)), "BatchNormalization") == 0


def test_noise_floor_raises_atol_only_as_far_as_ort_itself_rounds():
    ref = [{"y": np.array([0.3, 0.5], dtype=np.float32)}]
    got = [{"y": np.array([0.30005, 0.5], dtype=np.float32)}]  # 5e-5 off: over rtol 1e-4 + 1e-5
    [strict] = verify.compare(ref, got)
    [with_floor] = verify.compare(ref, got, floor={"y": 2e-5})  # ORT's fusions: 2e-5
    [small_floor] = verify.compare(ref, got, floor={"y": 1e-7})
    assert not strict.is_close and with_floor.is_close and not small_floor.is_close


def test_noise_floor_is_measured_only_when_an_output_needs_it(monkeypatch):
    """The floor costs a session of the original: a rewrite within the plain tolerance never
    pays it, one past it measures the floor once and is judged with it."""
    model = conv_bn_model()
    feeds = inputs.generate(model, batches=1)
    reference = verify.reference_outputs(model, feeds)
    measured = []
    monkeypatch.setattr(verify, "noise_floor",
                        lambda *args: measured.append(1) or {"y": 2e-5})
    floor = verify.NoiseFloor(model, reference, feeds)
    assert verify.verify(model, reference, feeds, floor=floor).passed
    assert measured == [] and floor() == {"y": 2e-5} and measured == [1]
    off = [{"y": batch["y"] + np.float32(5e-5) * np.sign(batch["y"])} for batch in reference]
    lazy = verify.NoiseFloor(model, off, feeds)
    [strict] = verify.compare(off, reference)
    checked = verify.verify(model, off, feeds, floor=lazy)
    assert not strict.is_close  # 5e-5 off: past atol 1e-5 + rtol 1e-4 somewhere
    assert checked.passed and checked.floor == {"y": 2e-5}  # 8 x 2e-5 covers it
    assert measured == [1, 1]  # once for this floor, not again for the second comparison


def test_bad_input_raised_by_a_pass_is_not_taken_for_a_crash():
    """A pass that finds the user's input unusable says so (exit 2); reverting it quietly would
    write a model the user did not ask for."""
    from onnxopt.errors import BadInputError

    class Refuses(ir.passes.InPlacePass):
        name = "refuses"

        def call(self, model):
            raise BadInputError("refuses: the weights file has nothing to match")

    model = conv_bn_model()
    for verify_each in (True, False):
        with pytest.raises(BadInputError, match="nothing to match"):
            pipeline.run_pipeline(model, [Refuses()], checker=checker_for(model),
                                  verify_each=verify_each)

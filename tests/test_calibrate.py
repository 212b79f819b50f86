"""Calibration: streamed statistics equal a direct computation; every data source; bad data."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import make_model, run, tensor, to_ir, value_info
from onnx import TensorProto, helper

from onnxopt.calib import sources
from onnxopt.calib.activations import collect_stats
from onnxopt.calib.histogram import TensorStats
from onnxopt.calib.sources import Preprocess, calibration_data, parse_preprocess
from onnxopt.errors import BadInputError


def growing_batches(seed: int, count: int = 50, size: int = 2000) -> list[np.ndarray]:
    """Batches whose spread and centre drift, so the histogram range has to grow many times."""
    rng = np.random.default_rng(seed)
    return [
        (rng.standard_normal(size) * (1 + 0.2 * i) + 0.1 * i).astype(np.float32)
        for i in range(count)
    ]


def filled(batches, bins: int = 2048) -> TensorStats:
    stats = TensorStats(bins)
    for batch in batches:
        stats.update(batch)
    return stats


def relu_model(dims, dtype=TensorProto.FLOAT, name: str = "x"):
    nodes = [helper.make_node("Relu", [name], ["y"], name="relu")]
    return to_ir(make_model(nodes, [value_info(name, dims, dtype)], [value_info("y", dims, dtype)]))


def add_model():
    nodes = [helper.make_node("Add", ["a", "b"], ["y"], name="add")]
    return to_ir(
        make_model(
            nodes,
            [value_info("a", ["N", 3]), value_info("b", ["N", 3])],
            [value_info("y", ["N", 3])],
        )
    )


def conv_relu_matmul(seed: int = 0):
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["x", "w", "bias"], ["conv_out"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv_out"], ["relu_out"], name="relu"),
        helper.make_node("MatMul", ["relu_out", "m"], ["y"], name="matmul"),
    ]
    inits = [
        tensor("w", rng.standard_normal((3, 2, 3, 3))),
        tensor("bias", rng.standard_normal(3)),
        tensor("m", rng.standard_normal((4, 5))),
    ]
    proto = make_model(
        nodes, [value_info("x", ["N", 2, 4, 4])], [value_info("y", ["N", 3, 4, 5])], inits
    )
    return proto, to_ir(onnx.shape_inference.infer_shapes(proto))


# Streamed statistics --------------------------------------------------------------------------


def test_streamed_stats_equal_one_histogram_of_all_data():
    batches = growing_batches(seed=1)
    streamed = filled(batches)
    everything = np.concatenate(batches)
    direct = filled([everything])
    assert streamed.min == everything.min() and streamed.max == everything.max()
    assert streamed.count == everything.size == 100_000
    # Power-of-two bins re-bin exactly: the streamed histogram is the direct one, bit for bit.
    assert streamed.exponent == direct.exponent and np.array_equal(streamed.hist, direct.hist)
    width = direct.width
    for method, args in [
        ("range_percentile", (99.99,)),
        ("range_entropy", (128,)),
        ("range_mse", (8,)),
    ]:
        got, want = getattr(streamed, method)(*args), getattr(direct, method)(*args)
        np.testing.assert_allclose(got, want, atol=width, err_msg=method)
    # And against numpy on the raw values: a histogram percentile is within one bin.
    lo, hi = streamed.range_percentile(99.9)
    assert abs(lo - np.percentile(everything, 0.1)) <= width
    assert abs(hi - np.percentile(everything, 99.9)) <= width
    (_, t) = streamed.range_percentile(99.9, symmetric=True)
    assert abs(t - np.percentile(np.abs(everything), 99.9)) <= width


def test_merge_of_two_halves_equals_the_whole():
    batches = growing_batches(seed=2)
    first, second = filled(batches[:25]), filled(batches[25:])
    first.merge(second)
    whole = filled(batches)
    assert (first.min, first.max, first.count) == (whole.min, whole.max, whole.count)
    assert first.exponent == whole.exponent and np.array_equal(first.hist, whole.hist)
    assert first.range_mse() == whole.range_mse()


def test_nan_and_inf_activations_are_counted_not_binned():
    stats = filled([np.array([1.0, np.nan, -2.0, np.inf], np.float32)])
    assert (stats.count, stats.nonfinite, stats.min, stats.max) == (2, 2, -2.0, 1.0)


def symmetric_int8(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    scale = max(abs(lo), abs(hi)) / 127
    return np.clip(np.round(x / scale), -127, 127) * scale


def test_mse_range_clips_an_outlier_and_lowers_the_real_error():
    rng = np.random.default_rng(3)
    x = rng.standard_normal(400_000)
    x[123] = 20.0
    stats = filled([x])
    lo_mm, hi_mm = stats.range_minmax()
    lo, hi = stats.range_mse(8)
    assert hi_mm == 20.0 and 3.0 < hi < 8.0  # tighter than minmax, not absurdly so
    assert lo == max(-hi, stats.min)  # ranges never reach past the data
    error_mse = np.mean((symmetric_int8(x, lo, hi) - x) ** 2)
    error_minmax = np.mean((symmetric_int8(x, lo_mm, hi_mm) - x) ** 2)
    assert error_mse < 0.5 * error_minmax  # measured: 6.7e-4 vs 2.1e-3


def test_asymmetric_mse_keeps_zero_for_relu_outputs():
    rng = np.random.default_rng(4)
    stats = filled([np.maximum(rng.standard_normal(100_000), 0)])
    lo, hi = stats.range_mse(8, symmetric=False)
    assert lo == 0.0 and 2.5 < hi < stats.max


def test_entropy_range_of_a_gaussian_is_a_few_sigma():
    rng = np.random.default_rng(5)
    sigma = 0.5
    stats = filled([rng.standard_normal(1_000_000) * sigma])
    lo, hi = stats.range_entropy(128)
    assert lo == -hi and 2.5 * sigma < hi < 6 * sigma  # measured ≈ 4.6σ
    assert hi < stats.max


def test_memory_does_not_grow_with_batches():
    rng = np.random.default_rng(6)
    stats = TensorStats(512)
    for i in range(1000):
        stats.update(rng.standard_normal(64) * (1 + i))  # the range keeps growing
        if i + 1 == 10:
            after_10 = {k: v.nbytes for k, v in vars(stats).items() if isinstance(v, np.ndarray)}
    after_1000 = {k: v.nbytes for k, v in vars(stats).items() if isinstance(v, np.ndarray)}
    assert after_10 == after_1000 == {"hist": 512 * 8}
    assert stats.count == 64_000


# Data sources ---------------------------------------------------------------------------------


def test_npz_one_batch_stack_and_split_into_the_model_batch_size(tmp_path):
    model = relu_model([2, 3])
    x = np.arange(18, dtype=np.float32).reshape(6, 3)
    np.savez(tmp_path / "one.npz", x=x[:2])
    np.savez(tmp_path / "stack.npz", x=x.reshape(3, 2, 3))
    np.savez(tmp_path / "split.npz", x=x)
    np.savez_compressed(tmp_path / "compressed.npz", x=x)
    [one] = list(calibration_data(tmp_path / "one.npz", model))
    np.testing.assert_array_equal(one["x"], x[:2])
    for name in ("stack.npz", "split.npz", "compressed.npz"):
        data = calibration_data(tmp_path / name, model)
        batches = [b["x"] for b in data]
        assert (len(data), data.sample_count, data.is_random) == (3, 6, False)
        np.testing.assert_array_equal(np.concatenate(batches), x, err_msg=name)
        assert all(type(b) is np.ndarray and b.shape == (2, 3) for b in batches)


def test_folder_of_npy_and_of_npz_sorted_by_name(tmp_path):
    rng = np.random.default_rng(7)
    arrays = [rng.standard_normal((2, 3)).astype(np.float32) for _ in range(3)]
    (tmp_path / "npy").mkdir()
    (tmp_path / "npz").mkdir()
    for i, array in enumerate(arrays):
        np.save(tmp_path / "npy" / f"{2 - i}.npy", array)  # names sort in reverse order
        np.savez(tmp_path / "npz" / f"{i}.npz", a=array, b=-array)
    (tmp_path / "npy" / "README.txt").write_text("ignored")
    got = [b["x"] for b in calibration_data(tmp_path / "npy", relu_model(["N", 3]))]
    np.testing.assert_array_equal(np.stack(got), np.stack(arrays[::-1]))
    data = calibration_data(tmp_path / "npz", add_model())
    batches = list(data)
    assert len(data) == 3 and all(np.array_equal(b["b"], -b["a"]) for b in batches)
    assert len(list(data)) == 3  # iterating again reads the files again


def test_calib_samples_caps_rows_across_batches(tmp_path):
    x = np.arange(30, dtype=np.float32).reshape(5, 2, 3)
    np.savez(tmp_path / "d.npz", x=x)
    data = calibration_data(tmp_path / "d.npz", relu_model(["N", 3]), samples=5)
    rows = [b["x"].shape[0] for b in data]
    assert rows == [2, 2, 1] and data.sample_count == 5 and len(data) == 3
    # A fixed batch size keeps whole batches, rounding down.
    data = calibration_data(tmp_path / "d.npz", relu_model([2, 3]), samples=5)
    assert [b["x"].shape[0] for b in data] == [2, 2] and data.sample_count == 4
    assert any("whole batches" in n for n in data.notes)


def test_random_data_is_flagged_and_reproducible():
    model = relu_model([4, 3])
    data = calibration_data("random", model, samples=12)
    batches = list(data)
    assert data.is_random and len(batches) == 3 and batches[0]["x"].shape == (4, 3)
    assert "RANDOM" in data.notes[0]
    again = list(calibration_data("random", model, samples=12))
    assert all(np.array_equal(a["x"], b["x"]) for a, b in zip(batches, again))
    assert not np.array_equal(batches[0]["x"], batches[1]["x"])


def test_parse_preprocess():
    spec = parse_preprocess(
        "size=224,mean=0.485/0.456/0.406,std=0.229/0.224/0.225,layout=NCHW,scale=1/255"
    )
    assert spec == Preprocess((224, 224), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 1 / 255)
    assert parse_preprocess("size=32x48,channels=bgr,layout=nhwc").size == (32, 48)
    assert parse_preprocess("").scale == 1 / 255
    for bad in ("size=0", "mean=a", "std=0", "layout=NCWH", "colour=RGB", "scale=1/0"):
        with pytest.raises(BadInputError, match="--preprocess"):
            parse_preprocess(bad)


def test_image_folder_with_preprocessing(tmp_path):
    image = pytest.importorskip("PIL.Image", reason="Pillow not installed")
    rng = np.random.default_rng(8)
    pixels = [rng.integers(0, 256, (4, 6, 3), dtype=np.uint8) for _ in range(3)]
    for i, p in enumerate(pixels):
        image.fromarray(p).save(tmp_path / f"img{i}.png")
    model = relu_model([1, 3, 4, 6], name="image")
    spec = "mean=0.485/0.456/0.406,std=0.229/0.224/0.225,scale=1/255"  # size from the model
    batches = list(calibration_data(tmp_path, model, preprocess=spec))
    assert len(batches) == 3 and batches[0]["image"].shape == (1, 3, 4, 6)
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    want = ((pixels[1].astype(np.float32) * np.float32(1 / 255) - mean) / std).transpose(2, 0, 1)
    np.testing.assert_array_equal(batches[1]["image"][0], want)
    # NHWC, BGR, and a resize to the declared size.
    nhwc = relu_model(["N", 8, 12, 3], name="image")
    data = calibration_data(
        tmp_path, nhwc, preprocess="size=8x12,layout=NHWC,channels=BGR,scale=1", batch_size=2
    )
    batches = list(data)
    assert [b["image"].shape for b in batches] == [(2, 8, 12, 3)]
    assert any("left out" in n for n in data.notes)  # 3 images, batches of 2
    big = np.asarray(image.fromarray(pixels[0]).resize((12, 8), image.Resampling.BILINEAR))
    np.testing.assert_array_equal(batches[0]["image"][0], big[:, :, ::-1].astype(np.float32))


# Bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arrays, match",
    [
        ({"a": np.zeros((2, 3), np.float32)}, r"missing \['b'\]"),
        (
            {
                "a": np.zeros((2, 3), np.float32),
                "b": np.zeros((2, 3), np.float32),
                "c": np.zeros(1, np.float32),
            },
            r"unknown \['c'\]",
        ),
        (
            {"a": np.zeros((2, 3), np.float64), "b": np.zeros((2, 3), np.float32)},
            r"input 'a' is float64, the model wants float32",
        ),
        (
            {"a": np.zeros((2, 4), np.float32), "b": np.zeros((2, 3), np.float32)},
            r"input 'a' has shape \[2, 4\], the model wants \[N,3\]",
        ),
        (
            {"a": np.zeros((2, 3), np.float32), "b": np.full((2, 3), np.nan, np.float32)},
            r"input 'b' batch 0 holds 6 NaN",
        ),
    ],
)
def test_bad_npz_names_the_tensor(tmp_path, arrays, match):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(BadInputError, match=match) as error:
        list(calibration_data(tmp_path / "bad.npz", add_model()))
    assert "bad.npz" in str(error.value) and "\n" not in str(error.value)


def test_nan_names_the_batch_in_a_stack(tmp_path):
    x = np.zeros((4, 2, 3), np.float32)
    x[2, 1, 0] = np.inf
    np.savez(tmp_path / "d.npz", x=x)
    data = calibration_data(tmp_path / "d.npz", relu_model(["N", 3]))
    with pytest.raises(BadInputError, match=r"d.npz: input 'x' batch 2 holds 1 Inf"):
        list(data)


def test_split_needs_a_multiple_of_the_batch_size(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((5, 3), np.float32))
    with pytest.raises(BadInputError, match=r"shape \[5, 3\].*N×2 rows to split"):
        calibration_data(tmp_path / "d.npz", relu_model([2, 3]))


def test_empty_folder_missing_path_and_images_without_preprocess(tmp_path):
    with pytest.raises(BadInputError, match="empty folder"):
        calibration_data(tmp_path, relu_model(["N", 3]))
    with pytest.raises(BadInputError, match="no such file"):
        calibration_data(tmp_path / "nope.npz", relu_model(["N", 3]))
    (tmp_path / "a.png").write_bytes(b"not really")
    with pytest.raises(BadInputError, match="--preprocess"):
        calibration_data(tmp_path, relu_model(["N", 3]))


def test_unreadable_image_is_named(tmp_path):
    image = pytest.importorskip("PIL.Image", reason="Pillow not installed")
    image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "b.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(BadInputError, match=r"b\.jpg: unreadable image"):
        calibration_data(tmp_path, relu_model([1, 3, 4, 4]), preprocess="scale=1")


def test_missing_pillow_is_one_line(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "PIL", None)  # import PIL now raises ImportError
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(BadInputError, match="pip install pillow"):
        calibration_data(tmp_path, relu_model([1, 3, 4, 4]), preprocess="scale=1")


# collect_stats --------------------------------------------------------------------------------


def test_collect_stats_equals_per_batch_numpy_min_max():
    proto, model = conv_relu_matmul(seed=0)
    rng = np.random.default_rng(9)
    batches = [
        {"x": (rng.standard_normal((2, 2, 4, 4)) * (1 + i)).astype(np.float32)} for i in range(5)
    ]
    calls = []
    stats = collect_stats(
        model,
        batches,
        ["conv_out", "relu_out", "x"],
        bins=256,
        progress=lambda done, total: calls.append((done, total)),
    )
    exposed = onnx.shape_inference.infer_shapes(proto)
    exposed.graph.output.extend(
        [helper.make_tensor_value_info("conv_out", TensorProto.FLOAT, None)]
    )
    conv = [run(exposed, b)[1] for b in batches]  # one run per batch, in numpy
    assert stats["conv_out"].min == min(c.min() for c in conv)
    assert stats["conv_out"].max == max(c.max() for c in conv)
    assert stats["conv_out"].count == sum(c.size for c in conv)
    assert (stats["relu_out"].min, stats["relu_out"].max) == (0.0, stats["conv_out"].max)
    assert stats["x"].max == max(b["x"].max() for b in batches)
    assert calls == [(i, 5) for i in range(1, 6)]
    assert len(model.graph.outputs) == 1  # the caller's model is untouched


def test_collect_stats_refuses_weights_and_unknown_tensors():
    _, model = conv_relu_matmul()
    feeds = [{"x": np.zeros((1, 2, 4, 4), np.float32)}]
    with pytest.raises(BadInputError, match=r"'w' is a weight"):
        collect_stats(model, feeds, ["w"])
    with pytest.raises(BadInputError, match=r"'nope' is not in the main graph"):
        collect_stats(model, feeds, ["nope"])
    with pytest.raises(BadInputError, match="no batches"):
        collect_stats(model, [], ["relu_out"])


def test_collect_stats_streams_a_calibration_folder(tmp_path):
    _, model = conv_relu_matmul()
    rng = np.random.default_rng(10)
    for i in range(4):
        np.save(tmp_path / f"{i}.npy", rng.standard_normal((3, 2, 4, 4)).astype(np.float32))
    data = calibration_data(tmp_path, model, samples=10)
    stats = collect_stats(model, data, ["relu_out"])
    assert stats["relu_out"].count == 10 * 3 * 4 * 4 and sources.RANDOM == "random"


def test_int8_calibration_input_memory_does_not_grow_with_the_batch_count(tmp_path):
    """300 batches of 64 KB (19.7 MB): the calibration part is streamed from the file and the
    held-out part is capped at 32 batches, so Python-side peak memory stays a few MB."""
    import tracemalloc

    from onnxopt.quant import int8, prepare

    model = relu_model([1, 1, 128, 128])
    path = tmp_path / "calib.npz"
    np.savez(path, x=np.random.default_rng(11).standard_normal((300, 1, 1, 128, 128))
             .astype(np.float32))
    options = int8.Int8Options(calib=str(path))
    tracemalloc.start()
    try:
        calib, held = prepare.split_data(model, options, [])
        stats = collect_stats(model, calib, ["y"])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (len(calib), len(held)) == (268, 32)
    assert stats["y"].count == 268 * 128 * 128
    assert peak < 6e6, f"peak {peak / 1e6:.1f} MB"
    again = sum(1 for _ in calib)  # a stream that reads again, not a used-up iterator
    assert again == 268

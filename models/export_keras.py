"""Export two small Keras models with BatchNormalization through tf2onnx.

Run with the TensorFlow venv (see models/make_all.sh):

    /work/venv-tf/bin/python models/export_keras.py

tf2onnx 1.17's `from_keras` does not work with Keras 3 (TF >= 2.16's default
`tf.keras`: KeyError 'keras_tensor_N' when mapping output names), so this script
uses Keras 2 from the `tf_keras` package (TF_USE_LEGACY_KERAS=1).

Writes models/keras_cnn_bn.onnx and models/keras_mlp_bn.onnx (opset 13, tf2onnx
defaults), plus models/keras_cnn_bn_unfused.onnx (same model and weights, exported
with tf2onnx's Conv+BN fusion switched off so BatchNormalization nodes remain), checks
them with onnx.checker and compares onnxruntime CPU against Keras (< 1e-4), and
prints a description of each exported graph (op histogram, Transposes, whether
weights are initializers or Constant nodes, BN/Mul/Add left).
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import sys  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf2onnx  # noqa: E402
import tf_keras as keras  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
OPSET = 13
TOL = 1e-4


def randomize(model: keras.Model, rng: np.random.Generator) -> None:
    """Non-trivial BN moving stats / affine params and non-zero Dense/Conv biases."""
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.gamma.shape[-1]
            layer.set_weights(
                [
                    rng.uniform(0.25, 1.75, c).astype(np.float32),  # gamma
                    rng.normal(0.0, 0.5, c).astype(np.float32),  # beta
                    rng.normal(0.0, 0.5, c).astype(np.float32),  # moving_mean
                    rng.uniform(0.1, 2.1, c).astype(np.float32),  # moving_variance
                ]
            )
        elif getattr(layer, "use_bias", False) and layer.weights:
            w = layer.get_weights()
            w[-1] = rng.normal(0.0, 0.2, w[-1].shape).astype(np.float32)
            layer.set_weights(w)


def cnn_bn() -> keras.Model:
    inp = keras.Input((32, 32, 3), name="input")
    x = keras.layers.Conv2D(16, 3, padding="same", use_bias=False, name="conv1")(inp)
    x = keras.layers.BatchNormalization(epsilon=1e-3, name="bn1")(x)
    x = keras.layers.ReLU(name="relu1")(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(x)
    x = keras.layers.BatchNormalization(epsilon=1e-3, name="bn2")(x)
    x = keras.layers.ReLU(name="relu2")(x)
    x = keras.layers.Conv2D(32, 1, use_bias=True, name="pw")(x)
    x = keras.layers.BatchNormalization(epsilon=1e-3, name="bn3")(x)
    x = keras.layers.ReLU(name="relu3")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    out = keras.layers.Dense(10, name="logits")(x)
    return keras.Model(inp, out, name="keras_cnn_bn")


def mlp_bn() -> keras.Model:
    inp = keras.Input((20,), name="input")
    x = keras.layers.Dense(32, name="fc1")(inp)
    x = keras.layers.BatchNormalization(epsilon=1e-3, name="bn1")(x)
    x = keras.layers.ReLU(name="relu1")(x)
    out = keras.layers.Dense(10, name="logits")(x)
    return keras.Model(inp, out, name="keras_mlp_bn")


def describe(m: onnx.ModelProto) -> dict:
    ops: dict[str, int] = {}
    for n in m.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return dict(
        ops=ops,
        nodes=len(m.graph.node),
        initializers=len(m.graph.initializer),
        constant_nodes=ops.get("Constant", 0),
        opset=next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")),
        ir=m.ir_version,
        inputs=[
            (i.name, [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim])
            for i in m.graph.input
        ],
        outputs=[
            (o.name, [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim])
            for o in m.graph.output
        ],
    )


class keep_conv_bn:
    """Temporarily disable tf2onnx's Conv+BatchNormalization fusion.

    tf2onnx's BackToBackOptimizer folds every Conv -> BatchNormalization pair (4-D
    weights) into the Conv, so the default export has no BN left. This context
    manager removes that one rewrite from its handler table so that the BN nodes
    survive (everything else, e.g. the Transpose push-down, still runs).
    """

    def __enter__(self):
        from tf2onnx.optimizer import back_to_back_optimizer as b2b

        self._map = b2b._func_map
        self._key = ("Conv", "BatchNormalization")
        self._saved = self._map.pop(self._key)
        return self

    def __exit__(self, *exc):
        self._map[self._key] = self._saved
        return False


def export(
    name: str, model: keras.Model, shape: tuple, rng: np.random.Generator, randomize_: bool = True
) -> dict:
    if randomize_:
        randomize(model, rng)
    spec = (tf.TensorSpec((None, *shape), tf.float32, name="input"),)
    path = os.path.join(HERE, f"{name}.onnx")
    proto, _ = tf2onnx.convert.from_keras(
        model, input_signature=spec, opset=OPSET, output_path=path
    )
    m = onnx.load(path)
    onnx.checker.check_model(m, full_check=True)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    diffs = []
    for bs in (1, 4):
        x = rng.normal(0.0, 1.0, (bs, *shape)).astype(np.float32)
        ref = model(x, training=False).numpy()
        got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
        assert got.shape == ref.shape, (got.shape, ref.shape)
        diffs.append(float(np.abs(got - ref).max()))
    d = max(diffs)
    assert d < TOL, f"{path}: max abs diff {d}"
    info = describe(m)
    info.update(file=os.path.basename(path), size=os.path.getsize(path), diff=d)
    return info


def main() -> int:
    print(f"tensorflow {tf.__version__}  tf_keras {keras.__version__}  tf2onnx {tf2onnx.__version__}"
          f"  onnx {onnx.__version__}  onnxruntime {ort.__version__}")
    tf.random.set_seed(0)
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    cnn = cnn_bn()
    rows = [
        export("keras_cnn_bn", cnn, (32, 32, 3), rng),
        export("keras_mlp_bn", mlp_bn(), (20,), rng),
    ]
    with keep_conv_bn():
        # same Keras model and weights as keras_cnn_bn.onnx
        rows.append(export("keras_cnn_bn_unfused", cnn, (32, 32, 3), rng, randomize_=False))
    n_bn = sum(v for r in rows[2:] for k, v in r["ops"].items() if k == "BatchNormalization")
    assert n_bn == 3, rows[2]["ops"]
    for r in rows:
        print(
            f"{r['file']}: opset {r['opset']}  IR {r['ir']}  nodes {r['nodes']}  "
            f"initializers {r['initializers']}  Constant nodes {r['constant_nodes']}  "
            f"{r['size']:,} bytes  max abs diff {r['diff']:.2e}"
        )
        print(f"  inputs {r['inputs']}  outputs {r['outputs']}")
        print(f"  ops {r['ops']}")
    for r in rows:
        m = onnx.load(os.path.join(HERE, r["file"]))
        print(f"{r['file']} node sequence:")
        for n in m.graph.node:
            print(f"  {n.op_type:20s} {list(n.input)} -> {list(n.output)}")
    print(f"OK: {len(rows)} files verified")
    return 0


if __name__ == "__main__":
    sys.exit(main())

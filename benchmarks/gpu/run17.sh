#!/bin/bash
# GPU checks for issue 17 on the device machine (see benchmarks/README.md, "GPU runs"):
# onnxruntime-gpu swapped in, the cuda/half tests, validate CPU vs CUDA (exact fp32 in checks),
# bench --ep tensorrt without TensorRT (the fallback note), `optimize --fp16` on CUDA, and
# benchmarks/half.py: fp16 fidelity on real CUDA kernels and latency at batch 1/16/64 against
# fp32 (ORT default, TF32) and onnxconverter-common. Everything goes to $OUT.
# Carries gpu/whl (onnxopt + onnx-ir wheels) and gpu/half (`benchmarks/half.py --export gpu/half`
# plus the onnxconverter-common wheel); /tmp/p holds the five parts of onnxruntime-gpu.
export PYTHONUNBUFFERED=1
ROOT=$(pwd)
python3 -m pip uninstall -y onnxruntime 2>&1 | tail -1
W=/tmp/onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl
cat /tmp/p/part0 /tmp/p/part1 /tmp/p/part2 /tmp/p/part3 /tmp/p/part4 > $W
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $W gpu/whl/*.whl \
    gpu/half/*.whl 2>&1 | tail -3
export PYTHONPATH=/tmp/site
cd /tmp && python3 -c "import onnxruntime as o, onnxopt; print(o.__version__, o.get_available_providers(), onnxopt.__file__)"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
cd $ROOT
H=gpu/half
LIGHT=${LIGHT:-}   # LIGHT=--light adds onnx's light models (about 2 more minutes)
timeout 60 python3 -P -m pytest -q -x -p no:cacheprovider tests/test_half.py tests/test_cuda_sessions.py \
    2>&1 | tee $OUT/pytest.txt | tail -5
# The CLI from outside the checkout: there `onnxopt` is the installed wheel, not the sources.
H=$ROOT/gpu/half
cd /tmp
D=$(python3 -c "import onnxopt.api as a; print(a.default_model_path())")
for m in digits; do
  case $m in digits) f=$D; s="";; det) f=$H/ppocr_det.onnx; s="--shape x:1,3,640,640";; esac
  timeout 40 python3 -m onnxopt validate $f --ep cpu,cuda $s > $OUT/validate_$m.txt 2>&1
  echo "validate $m rc=$?"; tail -3 $OUT/validate_$m.txt
done
timeout 40 python3 -m onnxopt bench $D --ep tensorrt --time 1 > $OUT/bench_trt.txt 2>&1
echo "bench tensorrt rc=$?"; tail -4 $OUT/bench_trt.txt
timeout 40 python3 -m onnxopt optimize $H/ppocr_cls.onnx -o /tmp/cls_fp16.onnx --fp16 \
    --inputs $H/ppocr_cls.npz --report $OUT/fp16_cls.json > $OUT/fp16_cls.txt 2>&1
echo "fp16 cls rc=$?"; grep -E "float16|budget|speed|kept|cuda|note" $OUT/fp16_cls.txt | head -12
cd $ROOT
# CUDA_OPTIONS: also time fp32 and the half model (at any speed) channels-last and/or as one
# CUDA graph (half.py --cuda-options); CUDA_OPTIONS= leaves them out.
CUDA_OPTIONS=${CUDA_OPTIONS-nhwc,graph}
timeout 190 python3 benchmarks/half.py --ep cuda $LIGHT --deploy-batch 16 --batches 1,16,64 --seconds 2 \
    ${CUDA_OPTIONS:+--cuda-options $CUDA_OPTIONS} \
    --json $OUT/half-cuda.json --models digits_resnet \
    ppocr_det=$H/ppocr_det.onnx:$H/ppocr_det.npz ppocr_rec=$H/ppocr_rec.onnx:$H/ppocr_rec.npz \
    ppocr_cls=$H/ppocr_cls.onnx:$H/ppocr_cls.npz > $OUT/half-cuda.txt 2>&1
echo "half.py rc=$?"; tail -45 $OUT/half-cuda.txt

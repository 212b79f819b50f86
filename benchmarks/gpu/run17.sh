#!/bin/bash
# GPU checks for issue 17 on the device machine (see benchmarks/README.md, "GPU runs"):
# onnxruntime-gpu swapped in, the cuda/half tests, validate CPU vs CUDA (TF32 off in checks),
# bench --ep tensorrt without TensorRT (the fallback note), --fp16 on each model, and
# benchmarks/half.py: fp16 fidelity on real CUDA kernels and latency at batch 1/16/64 against
# fp32 and onnxconverter-common. Everything it prints goes to $OUT.
export PYTHONUNBUFFERED=1
ROOT=$(pwd)
python3 -m pip uninstall -y onnxruntime 2>&1 | tail -1
W=/tmp/onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl
cat /tmp/p/part0 /tmp/p/part1 /tmp/p/part2 /tmp/p/part3 /tmp/p/part4 > $W
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $W gpu/whl/*.whl 2>&1 | tail -3
export PYTHONPATH=/tmp/site
cd /tmp && python3 -c "import onnxruntime as o, onnxopt; print(o.__version__, o.get_available_providers(), onnxopt.__file__)"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
cd $ROOT
M=gpu/m17
timeout 150 python3 -P -m pytest -q -p no:cacheprovider tests/test_half.py tests/test_cuda_sessions.py \
    tests/test_half_kernels.py -k "cuda or half or tf32 or tensorrt" 2>&1 | tee $OUT/pytest.txt | tail -6
for m in digits cls det; do
  case $m in digits) s="";; cls) s="--shape x:1,3,48,192";; det) s="--shape x:1,3,640,640";; esac
  timeout 60 python3 -m onnxopt validate $M/${m}_dense.onnx --ep cpu,cuda $s > $OUT/validate_$m.txt 2>&1
  echo "validate $m rc=$?"; tail -4 $OUT/validate_$m.txt
done
timeout 60 python3 -m onnxopt bench $M/digits_dense.onnx --ep tensorrt --time 1 > $OUT/bench_trt.txt 2>&1
echo "bench tensorrt rc=$?"; cat $OUT/bench_trt.txt | tail -8
for m in digits cls rec det; do
  case $m in digits) s="";; cls) s="--shape x:1,3,48,192";; rec) s="--shape x:1,3,48,320";; det) s="--shape x:1,3,640,640";; esac
  timeout 60 python3 -m onnxopt optimize $M/${m}_dense.onnx -o /tmp/${m}_fp16.onnx --fp16 $s \
      --report $OUT/fp16_$m.json > $OUT/fp16_$m.txt 2>&1
  echo "fp16 $m rc=$?"; grep -E "float16|budget|speed|kept|cuda" $OUT/fp16_$m.txt | head -8
done
timeout 240 python3 benchmarks/half.py --ep cuda --light --batches 1,16,64 \
    --models digits=$M/digits_dense.onnx cls=$M/cls_dense.onnx:gpu/inputs/cls.npz \
    rec=$M/rec_dense.onnx:gpu/inputs/rec.npz det=$M/det_dense.onnx:gpu/inputs/det.npz \
    --json $OUT/half-gpu.json > $OUT/half-gpu.txt 2>&1
echo "half.py rc=$?"; tail -40 $OUT/half-gpu.txt

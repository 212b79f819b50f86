#!/bin/bash
# GPU checks for issues 15/17: cuda tests, channel-pruned vs dense latency on CPU and CUDA.
export PYTHONUNBUFFERED=1
ROOT=$(pwd)
python3 -m pip uninstall -y onnxruntime 2>&1 | tail -1
W=/tmp/onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl
cat /tmp/p/part0 /tmp/p/part1 /tmp/p/part2 /tmp/p/part3 /tmp/p/part4 > $W
ls -la $W
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $W gpu/whl/*.whl 2>&1 | tail -3
export PYTHONPATH=/tmp/site
cd /tmp && python3 -c "import onnxruntime as o, onnxopt; print(o.__version__, o.get_available_providers(), onnxopt.__file__)"
nvidia-smi --query-gpu=name,driver_version --format=csv
cd $ROOT
timeout 150 python3 -P -m pytest -q -p no:cacheprovider tests -k "cuda" 2>&1 | tee $OUT/pytest_cuda.txt | tail -8
cd $ROOT/gpu/models
for m in digits cls rec det; do
  case $m in digits) s="";; cls) s="--shape x:1,3,48,192";; rec) s="--shape x:1,3,48,320";; det) s="--shape x:1,3,640,640";; esac
  variants=$(ls ${m}_*.onnx | grep -v dense)
  echo "== $m: ${m}_dense.onnx $variants"
  timeout 100 python3 -m onnxopt bench ${m}_dense.onnx $variants --ep cpu,cuda --batch 1,8 --time 2 --no-placement $s --json $OUT/bench_$m.json > $OUT/bench_$m.txt 2>&1
  echo "rc=$?"; grep -E "ratio|x |cuda|cpu" $OUT/bench_$m.txt | head -20
done

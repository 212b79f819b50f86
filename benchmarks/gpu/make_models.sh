#!/bin/bash
# The models benchmarks/gpu/run.sh times, into gpu/models: each family's dense model (onnxopt's
# exact pipeline) and its variants (here: channels with l2 importance, unstructured 50%).
# Run from the repository root with onnxopt installed; PP-OCR needs rapidocr-onnxruntime
# (benchmarks/README.md, set-up). Drop the *_orig.onnx copies before carrying gpu/models.
set -euo pipefail
mkdir -p gpu/models && cd gpu/models
ocr=$(python -c "import importlib.util as u; print(list(u.find_spec('rapidocr_onnxruntime').submodule_search_locations)[0])")/models
cp "$(python -c 'import onnxopt.api as a; print(a.default_model_path())')" digits_orig.onnx
onnxopt optimize digits_orig.onnx -o digits_dense.onnx --bench none -q
onnxopt optimize digits_orig.onnx -o digits_ch25.onnx --sparsity 0.25 --sparsity-pattern channels \
    --importance l2 --max-error none --bench none -q
onnxopt optimize digits_orig.onnx -o digits_u50.onnx --sparsity 0.5 --no-reconstruct \
    --max-error none --bench none -q
for m in cls:ch_ppocr_mobile_v2.0_cls_infer:1,3,48,192 rec:ch_PP-OCRv4_rec_infer:1,3,48,320 \
         det:ch_PP-OCRv4_det_infer:1,3,640,640; do
  IFS=: read -r n f s <<< "$m"
  cp "$ocr/$f.onnx" "${n}_orig.onnx"
  onnxopt optimize "${n}_orig.onnx" -o "${n}_dense.onnx" --bench none -q --shape "x:$s"
  onnxopt optimize "${n}_orig.onnx" -o "${n}_ch30.onnx" --sparsity 0.3 --sparsity-pattern channels \
      --importance l2 --max-error none --bench none -q --shape "x:$s"
done
rm -f ./*_orig.onnx
ls -la

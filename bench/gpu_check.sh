#!/usr/bin/env bash
# The checks one GPU lease runs (issue 16), prepared so that a 15-minute lease is spent on them alone.
#
# The device machine's python3 has torch (CUDA) but not synfer's other needs, and reaches no registry:
# they travel as wheels in .whl/ (git-ignored), built here first:
#
#     P="python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl"
#     $P diffusers==0.42.1 mmengine addict yapf termcolor tflite pydantic==2.14.4 pydantic_core==2.50.5 \
#        typing-inspection annotated-types importlib_metadata platformdirs typing_extensions
#     python -m pip wheel -q --no-deps --no-build-isolation . -w .whl
#
# then, on the device (carry .whl):   bash bench/gpu_check.sh eager      # the gpu tests + bench_gpu at batch 16, eager
#                                      bash bench/gpu_check.sh rest       # plugin load, batch 8, compiled rows
# Results land in $OUT (the device tool's folder), or out/gpu-check.
set -uo pipefail
OUT=${OUT:-out/gpu-check}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
BENCH=(python3 bench/bench_gpu.py --device cuda --width full --size 512 --steps 25 --dtype bfloat16 --peak-tflops 989)
case "${1:-eager}" in
  eager)
    { date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; } | tee "$OUT/env.txt"
    python3 -c "import torch, diffusers, transformers, synfer_plugins.sd.generator as g
print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())" \
      2>&1 | tee -a "$OUT/env.txt" || exit 1
    timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_sd15_topology.py -rA 2>&1 | tee "$OUT/gpu-tests.log"
    # batch 16 first, with the levers the 2026-12-04 H200 run pointed at: a larger guided micro-batch, and the guided
    # step's own forward reused to denoise it (semantic_guidance.reuse_forward)
    timeout 420 "${BENCH[@]}" --batch 16 --micro-batch 16 --reuse-forward --out "$OUT/gpu-bench.json" 2>&1 | tee "$OUT/gpu-bench.log"
    ;;
  rest)  # the plugin load as the machine's packages see it, then batch 8 and the compiled rows
    python3 -c "import pluggy, pydantic, peft, huggingface_hub as h, numpy
print('pluggy', pluggy.__version__, 'pydantic', pydantic.__version__, 'peft', peft.__version__, 'hub', h.__version__, 'numpy', numpy.__version__)" \
      2>&1 | tee "$OUT/registry.txt"
    python3 -m synfer plugins 2>&1 | tee -a "$OUT/registry.txt"  # a plugin left out prints its warning
    timeout 200 "${BENCH[@]}" --batch 8 --out "$OUT/gpu-bench-8.json" 2>&1 | tee "$OUT/gpu-bench-8.log"
    timeout 200 "${BENCH[@]}" --batch 16 --compile --rows bare synfer 'bare (compiled UNet)' 'synfer (compiled UNet)' \
      --out "$OUT/gpu-bench-compile.json" 2>&1 | tee "$OUT/gpu-bench-compile.log"
    ;;
esac

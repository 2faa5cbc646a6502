#!/usr/bin/env bash
# The GPU check of issue 16, sized for one device session (<= 8 minutes on one H200).
#
#   bash benchmarks/gpu_check.sh fetch   # here, with a registry: the wheels the device lacks
#   bash benchmarks/gpu_check.sh         # there (run tool, carry [".gpu_wheels"]): the check
#   GPU_CHECK_DRY=1 GPU_CHECK_N=20000 GPU_CHECK_IMAGES=640 bash benchmarks/gpu_check.sh
#                                        # here: every step on the CPU, to check the script
#
# The device has PyTorch with CUDA, Lightning, torchvision, timm, pyarrow and
# sentence-transformers, no package registry and no faiss (faiss-gpu cannot be carried: the
# torch backend of dbp_lightning/pruning/backend.py is what runs there). `fetch` puts the
# pure-Python wheels the project needs beyond that, and osqp's for the usual CPython versions,
# into .gpu_wheels/ (ignored by git; a few MB); the check installs them with no index into a
# private folder, never into the device's own environment. Then: the GPU tests
# (tests/test_gpu.py: torch-CUDA k-means and SemDeDup against CPU bytes, bf16 embedding against
# fp32, fit for a few steps with DBPDataModule under DDP/NCCL), `prune` on a synthetic 10M x 256
# store with backend=torch, `embed` on a synthetic image pool, one table at the end.
# Without a GPU it says so and exits 0.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=.gpu_wheels
PY=${PYTHON:-python3}

if [[ "${1:-}" == "fetch" ]]; then
  PIP=${PIP:-.venv/bin/pip}
  rm -rf "$WHEELS" && mkdir -p "$WHEELS"
  # pure Python: one wheel serves every interpreter (versions as requirements/constraints.txt pins)
  "$PIP" download -q --no-deps --only-binary=:all: -d "$WHEELS" -c requirements/constraints.txt \
    open_clip_torch webdataset braceexpand jsonargparse docstring_parser typeshed_client ftfy \
    qpsolvers clip_benchmark pytest pluggy iniconfig sortedcontainers joblib || exit 1
  for v in 3.10 3.11 3.12 3.13; do  # compiled: one wheel per CPython (whichever the device has)
    for dist in osqp qdldl hypothesis wcwidth; do
      "$PIP" download -q --no-deps --only-binary=:all: -d "$WHEELS" -c requirements/constraints.txt \
        --python-version "$v" --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 "$dist" 2>/dev/null \
        || echo "gpu_check fetch: no $dist wheel for CPython $v"
    done
  done
  du -sh "$WHEELS"
  exit 0
fi

# GPU_CHECK_DRY=1 runs every step on the CPU (small sizes) to check the script itself
if [[ -z "${GPU_CHECK_DRY:-}" ]] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no CUDA device here (torch.cuda.is_available() is False or torch is missing): nothing to check"
  exit 0
fi
"$PY" -c "import torch; print('gpu_check:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'dry run on the CPU', 'torch', torch.__version__)"
SITE=$(mktemp -d /tmp/gpu_check_site.XXXX)
WORK=$(mktemp -d /tmp/gpu_check_work.XXXX)
trap 'rm -rf "$SITE" "$WORK"' EXIT
# only what the device lacks, from the carried wheels, into a private folder
missing=$("$PY" - <<'EOF'
import importlib.util
need = {"open_clip": "open_clip_torch", "webdataset": "webdataset", "braceexpand": "braceexpand",
        "jsonargparse": "jsonargparse", "docstring_parser": "docstring_parser", "ftfy": "ftfy",
        "wcwidth": "wcwidth", "qpsolvers": "qpsolvers", "osqp": "osqp", "qdldl": "qdldl",
        "joblib": "joblib", "clip_benchmark": "clip_benchmark", "pytest": "pytest",
        "pluggy": "pluggy", "iniconfig": "iniconfig", "hypothesis": "hypothesis",
        "sortedcontainers": "sortedcontainers"}
print(" ".join(dist for mod, dist in need.items() if importlib.util.find_spec(mod) is None))
EOF
)
if [[ -n "$missing" ]]; then
  "$PY" -m pip install -q --no-index --no-deps --find-links "$WHEELS" --target "$SITE" $missing \
    || echo "gpu_check: some wheels did not install (missing: $missing); continuing"
fi
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
T0=$(date +%s)

echo "== GPU tests"
"$PY" -m pytest -q -rf -p no:cacheprovider tests/test_gpu.py tests/test_backend.py > "$WORK/tests.log" 2>&1
TESTS=$?
tail -15 "$WORK/tests.log"

N=${GPU_CHECK_N:-10000000}  # smaller for a quick look; the issue's figure is at 10M
echo "== prune $N x 256 (backend torch; stopped after 330 s so that the table still comes)"
"$PY" -m dbp_lightning.cli data synthetic --out "$WORK/pool" --n "$N" --dim 256 --dtype float16 \
  --n_concepts 2000 > "$WORK/synthetic.log" 2>&1 || tail -5 "$WORK/synthetic.log"
timeout 330 "$PY" - "$WORK" <<'EOF' > "$WORK/prune.json"
import json, sys, threading, time, torch
from dbp_lightning.cli import main
work = sys.argv[1]
peak = [0]
def watch():  # the device memory peak of the whole prune (the allocator's and cuBLAS's)
    while not done:
        free, total = torch.cuda.mem_get_info(); peak[0] = max(peak[0], total - free); time.sleep(0.05)
done = False
if torch.cuda.is_available():
    threading.Thread(target=watch, daemon=True).start()
t = time.perf_counter()
with __import__("contextlib").redirect_stdout(sys.stderr):  # stdout is this step's JSON
    code = main(["prune", "--input", f"{work}/pool", "--output", f"{work}/run", "--backend", "torch",
                 "--select.target_fraction", "0.5"])
done = True
report = json.load(open(f"{work}/run/report.json")) if code == 0 else {}
print(json.dumps({"code": code, "wall": time.perf_counter() - t, "gpu_peak_gib": peak[0] / 2**30,
                  "stages": report.get("stages", []), "backend": report.get("backend")}))
EOF

echo "== embed a synthetic image pool (tiny-clip, random weights, bf16)"
"$PY" - "$WORK" <<'EOF' > "$WORK/embed.json"
import io, json, sys, time
import numpy as np
from PIL import Image
sys.path.insert(0, "tests")
from wds_util import write_shards
from dbp_lightning.config import EncoderConfig, default_workers
from dbp_lightning.embed import embed_shards
work = sys.argv[1]
per_shard = int(__import__("os").environ.get("GPU_CHECK_IMAGES", "32000")) // 16
shards = write_shards(__import__("pathlib").Path(work) / "images", n_shards=16, per_shard=per_shard)
t = time.perf_counter()
store = embed_shards(shards, f"{work}/store", EncoderConfig(kind="open_clip", model="tiny-clip",
                     random_init=True), batch_size=512, num_workers=default_workers(8))
print(json.dumps({"samples": len(store), "wall": time.perf_counter() - t}))
EOF

echo "== summary ($(( $(date +%s) - T0 )) s)"
"$PY" - "$WORK" "$TESTS" <<'EOF'
import json, sys
work, tests = sys.argv[1], sys.argv[2]
def load(name):
    try:
        return json.load(open(f"{work}/{name}"))
    except Exception as exc:
        return {"error": str(exc)}
prune, embed = load("prune.json"), load("embed.json")
print("| check | result |\n|---|---|")
counts = [l for l in open(f"{work}/tests.log").read().splitlines() if " passed" in l or " failed" in l]
failed = [l.split()[1] for l in open(f"{work}/tests.log") if l.startswith("FAILED ")]
print(f"| GPU tests (tests/test_gpu.py, test_backend.py) | {'passed' if tests == '0' else 'FAILED'}: "
      f"{counts[-1].strip('= ') if counts else 'no summary'} {' '.join(failed)} |")
print(f"| prune {__import__('os').environ.get('GPU_CHECK_N', '10000000')} x 256, wall s | "
      f"{round(prune['wall'], 1) if 'wall' in prune else prune.get('error')} |")
for st in prune.get("stages", []):
    print(f"| prune stage {st['stage']}, s | {st['seconds']} ({st['in']:,} -> {st['out']:,}) |")
print(f"| prune GPU memory peak, GiB | {prune.get('gpu_peak_gib', '-')} |")
print(f"| prune backend | {prune.get('backend')} |")
if "samples" in embed:
    print(f"| embed samples/s | {embed['samples'] / embed['wall']:.0f} |")
else:
    print(f"| embed | {embed.get('error')} |")
EOF
exit 0

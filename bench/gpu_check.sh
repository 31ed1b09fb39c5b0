#!/usr/bin/env bash
# One device call: the device, the PyTorch reference (eager and torch.compile) and dmt_jax's step for
# ViT-Ti, S and B students (3 ViT-B/16 teachers, batch 256, mask 0.75), then a ratio table.
#
# The GPU machines have jax, flax, optax, torch and timm but not ml_collections: first, here,
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_17_x86_64 -d .whl ml_collections==1.1.0
# then one device call: command "bash bench/gpu_check.sh", carry [".whl"], timeout_s 580.
# Budget: ours <= 240 s, each reference <= 100 s, so the table prints inside one call.
set -uo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import ml_collections" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl || {
    echo "ml_collections is missing: download its wheel into .whl (see this script's header)"; exit 2; }
  export PYTHONPATH=/tmp/site
fi
out="${OUT:-/tmp}/gpu_check.jsonl"
: >"$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.85
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
python3 -c "import jax, torch, timm, flax; print('jax', jax.__version__, 'flax', flax.__version__, 'torch', torch.__version__, 'timm', timm.__version__, jax.devices())"
students="${STUDENTS:-s,ti,b}"
# ours first (the S row matters most), then the reference; each bounded so the table always prints.
timeout 240 python3 bench/step.py --student "$students" --batch 256 --mask-ratio 0.75 | tee -a "$out"
for s in ${students//,/ }; do
  # torch_reference.py is ../shared/bench/torch_reference.py, copied verbatim.
  timeout 100 python3 bench/torch_reference.py --student "$s" --batch 256 --mask-ratio 0.75 --compile | tee -a "$out"
done
python3 - "$out" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
print(f"\n{'student':8}{'impl':15}{'img/s':>9}{'step ms':>9}{'TFLOP/s':>9}{'MFU':>7}{'x compile':>11}")
for s in ("ti", "s", "b"):
    ref = next((r["img_per_s"] for r in rows if r["student"] == s and r["impl"] == "torch-compile"), None)
    for r in (r for r in rows if r["student"] == s):
        ratio = f"{r['img_per_s'] / ref:.2f}" if ref else "-"
        print(f"{s:8}{r['impl']:15}{r['img_per_s']:>9.0f}{r['step_ms']:>9.1f}{r['model_tflops']:>9.1f}"
              f"{r['mfu_vs_989']:>7.3f}{ratio:>11}")
PY

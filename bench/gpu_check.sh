#!/usr/bin/env bash
# One device call: the device, the PyTorch reference (eager and torch.compile) and dmt_jax's step for
# ViT-Ti, S and B students (3 ViT-B/16 teachers, batch 256, mask 0.75), then a ratio table, then the
# top kernels of our S step by time.
#
# The GPU machines have jax, flax, optax, torch and timm but not ml_collections: first, here,
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_17_x86_64 -d .whl ml_collections==1.1.0
# then one device call: command "bash bench/gpu_check.sh", carry [".whl"], timeout_s 590.
# Budget (seconds of the call): ours S (timed, then 3 steps traced: the profile) <= 110, ours Ti and B
# <= 150, ours S with opt-in XLA flags <= 70, each reference (eager + torch.compile) <= 80, so the table
# and the profile print by ~570 s. XLA_EXTRA_FLAGS (default --xla_gpu_triton_gemm_any=true) are the
# opt-in flags of the extra S row: never on by default. STUDENTS (default s,ti,b) picks the rows.
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
prof="${OUT:-/tmp}/profile_s.txt"
timeout 110 python3 bench/step.py --student s --batch 256 --mask-ratio 0.75 --profile-top 25 >"$prof" 2>&1
grep '^{' "$prof" | tee -a "$out"
rest=$(tr ',' '\n' <<<"$students" | grep -vx s | paste -sd, -)
[ -n "$rest" ] && timeout 150 python3 bench/step.py --student "$rest" --batch 256 --mask-ratio 0.75 | tee -a "$out"
flags="${XLA_EXTRA_FLAGS:---xla_gpu_triton_gemm_any=true}"
timeout 70 python3 bench/step.py --student s --batch 256 --mask-ratio 0.75 --xla-flags="$flags" | tee -a "$out"
for s in ${students//,/ }; do
  # torch_reference.py is ../shared/bench/torch_reference.py, copied verbatim.
  timeout 80 python3 bench/torch_reference.py --student "$s" --batch 256 --mask-ratio 0.75 --compile | tee -a "$out"
done
python3 - "$out" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
print(f"\n{'student':8}{'impl':15}{'img/s':>9}{'step ms':>9}{'TFLOP/s':>9}{'MFU':>7}{'x compile':>11}")
for s in ("ti", "s", "b"):
    ref = next((r["img_per_s"] for r in rows if r["student"] == s and r["impl"] == "torch-compile"), None)
    for r in (r for r in rows if r["student"] == s):
        ratio = f"{r['img_per_s'] / ref:.2f}" if ref else "-"
        impl = r["impl"] + ("+flags" if r.get("xla_flags") else "")
        print(f"{s:8}{impl:15}{r['img_per_s']:>9.0f}{r['step_ms']:>9.1f}{r['model_tflops']:>9.1f}"
              f"{r['mfu_vs_989']:>7.3f}{ratio:>11}")
PY
[ -n "$flags" ] && echo "+flags: XLA_FLAGS=$flags"
# The profile of our S step (3 steps traced after its timing): the top kernels by time.
grep -v '^{' "$prof" | tail -40

#!/usr/bin/env bash
# Every GPU figure docs/benchmarks.md records, in one run, on a machine with a CUDA GPU:
#   scripts/gpu-benchmark.sh OUT_DIR [WORKDIR]
# OUT_DIR gets the machine's description, the GPU tests' result, the calibration kernel at full
# Llama-3-70B shapes (JSON and table), and end-to-end throughput (TA + SVC and TA alone, K = 3,
# ~2.9B parameters x 4 in bf16, page cache emptied before every read when run as root) with the
# stage that limits. WORKDIR (default /tmp/dist-svc-gpu-bench) holds the generated models (~35 GB;
# they are kept for a rerun). Run from the repository root with dist-svc installed (a CUDA torch).
set -uo pipefail
OUT=${1:?usage: scripts/gpu-benchmark.sh OUT_DIR [WORKDIR]}
WORK=${2:-/tmp/dist-svc-gpu-bench}
mkdir -p "$OUT" "$WORK"
PY=${PYTHON:-python3}
step() { echo "== $* ($(date -u +%H:%M:%S))" | tee -a "$OUT/log.txt"; }

step machine
{ nvidia-smi; nproc; free -g; df -h "$WORK"; "$PY" -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"; } \
  > "$OUT/machine.txt" 2>&1

step "GPU tests"
"$PY" -m pytest tests/test_gpu.py -q -rs > "$OUT/test_gpu.txt" 2>&1
echo "exit $?" >> "$OUT/test_gpu.txt"

step "calibration kernel, full Llama-3-70B shapes"
"$PY" -m dist_svc.cli bench calibration --device cuda --repeats 3 --json "$OUT/calibration.json" \
  > "$OUT/calibration.txt" 2>&1

for mode in --calibrate --no-calibrate; do
  step "throughput $mode"
  "$PY" -m dist_svc.cli bench throughput "$WORK" --device cuda --layers 12 --hidden 4096 --repeats 3 $mode \
    --json "$OUT/throughput$mode.json" > "$OUT/throughput$mode.txt" 2>&1
done

step "CPU scaling on this machine's cores (calibration on, ~290M parameters)"
"$PY" -m dist_svc.cli bench scaling "$WORK" --threads "1,2,4,8,$(nproc)" > "$OUT/scaling.txt" 2>&1

step done

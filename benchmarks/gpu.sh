#!/usr/bin/env bash
# The prepared GPU run (issue 15): one command, under 8 minutes on one H100/H200-class GPU.
#
#   bash benchmarks/gpu.sh [OUT]        # OUT: results folder (default: $OUT if set, else gpu-results)
#
# 1. Installs diffquant with its peers (torchao) into the machine's Python, keeping its CUDA torch: the
#    constraint pins the torch already installed (constraints.txt's torch==2.13.0 is the CPU wheel, for CPU
#    machines). A machine without network installs from wheels in .whl/ (pip download them beside the
#    checkout; see docs/results-fullsize.md); without either, an already installed diffusers/torchao is used.
# 2. benchmarks/fullsize.py on the full-size SD 1.5 UNet (published config, random weights), in $DTYPE
#    (float16 unless set) on CUDA: a denoiser step at 64x64 and 128x128 latents (batch 2) for the FP16 model,
#    torchao's int8 dynamic quantization (torch.compile) and diffquant's W8A8 converted to the int_mm backend;
#    then RTN and Q-Diffusion (1 prompt x 4 steps = 8 samples, 20 + 10 iterations per block) with memory and
#    time per stage; then the FLOP profile. JSON: $OUT/fullsize-sd15-gpu.json (written after each part).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-gpu-results}}"
PY="${PYTHON:-python3}"
DTYPE="${DTYPE:-float16}"
mkdir -p "$OUT"
start=$(date +%s)

if [ "$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))')" != 1 ]; then
  echo "error: $PY sees no CUDA GPU (torch $("$PY" -c 'import torch; print(torch.__version__)')); run this on a GPU machine" >&2
  exit 2
fi
"$PY" -c 'import torch; print("torch", torch.__version__, "on", torch.cuda.get_device_name())'
echo "torch==$("$PY" -c 'import torch; print(torch.__version__)')" > "$OUT/constraints-gpu.txt"
pip_args=(-q --no-build-isolation -c "$OUT/constraints-gpu.txt")
[ -d .whl ] && pip_args+=(--no-index --find-links .whl)
if ! "$PY" -m pip install "${pip_args[@]}" -e '.[peers]' > "$OUT/install.log" 2>&1; then
  echo "warning: pip install -e '.[peers]' failed (see $OUT/install.log); using the source tree and what is installed"
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
echo "install: $(( $(date +%s) - start )) s"

export PYTHONUNBUFFERED=1
left=$(( 470 - ($(date +%s) - start) ))
timeout "$left" "$PY" benchmarks/fullsize.py --model sd15 --device cuda --dtype "$DTYPE" --methods speed,rtn,qdiffusion,profile \
  --latents 64,128 --torchao compiled --repeats 10 --prompts 1 --steps 4 --iterations 20 --act-iterations 10 --batch-size 8 \
  --threads 16 --workdir /tmp --out "$OUT/fullsize-sd15-gpu.json" || echo "stopped after $(( $(date +%s) - start )) s (partial JSON kept)"
echo "total: $(( $(date +%s) - start )) s; results: $OUT/fullsize-sd15-gpu.json"

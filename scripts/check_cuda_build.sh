#!/usr/bin/env bash
# Build ann_kernels._C against a CUDA build of torch on a machine WITHOUT a GPU, and import it
# as far as it gets without a driver (issue 14, item 1). Not part of CI: the CUDA torch is a
# multi-GB install. One command:
#
#   scripts/check_cuda_build.sh            # venv in /tmp/cuda-venv, build in /tmp/cuda-build
#
# Environment:
#   CUDA_VENV              the throwaway venv (default /tmp/cuda-venv; reused when present)
#   CUDA_TORCH_SPEC        the torch to install (default torch==2.14.1: on this workplace's
#                          machines pip takes that CUDA 13 build from local disk)
#   CUDA_BUILD_DIR         where a copy of the sources is built (default /tmp/cuda-build), so
#                          the worktree's CPU-only _C*.so is left alone
#   TORCH_CUDA_ARCH_LIST   archs to compile (default "9.0")
#   ANN_KERNELS_MAX_JOBS   parallel compile jobs (default 1: the dev machines are small)
#
# nvcc: the installed toolkit when its major version matches torch.version.cuda's, else the
# nvidia-cuda-nvcc wheel of torch's CUDA major is installed into the venv.
# Exit status: 0 when the build succeeded and the extension imported with its CUDA kernel
# registered; non-zero at the first step that failed (the log says which).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CUDA_VENV:-/tmp/cuda-venv}"
TORCH_SPEC="${CUDA_TORCH_SPEC:-torch==2.14.1}"
BUILD_DIR="${CUDA_BUILD_DIR:-/tmp/cuda-build}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export ANN_KERNELS_MAX_JOBS="${ANN_KERNELS_MAX_JOBS:-1}"
PY="$VENV/bin/python"

step() { printf '\n== [%s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }

step "1/6 venv $VENV with $TORCH_SPEC"
[ -x "$PY" ] || python3 -m venv "$VENV"
if ! "$PY" -c "import torch, sys; sys.exit(torch.version.cuda is None)" 2>/dev/null; then
  "$PY" -m pip install -q "$TORCH_SPEC"
fi
"$PY" -m pip install -q setuptools wheel numpy pybind11 ninja tqdm matplotlib
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
TORCH_CUDA_MAJOR="$("$PY" -c "import torch; print((torch.version.cuda or '').split('.')[0])")"
[ -n "$TORCH_CUDA_MAJOR" ] || { echo "FAIL: $TORCH_SPEC is not a CUDA build of torch"; exit 2; }

step "2/6 nvcc matching CUDA $TORCH_CUDA_MAJOR"
nvcc_major() { "$1" --version | sed -n 's/.*release \([0-9]*\)\..*/\1/p'; }
NVCC=""
for candidate in "${CUDA_HOME:+$CUDA_HOME/bin/nvcc}" /usr/local/cuda/bin/nvcc "$(command -v nvcc || true)"; do
  if [ -n "$candidate" ] && [ -x "$candidate" ] && [ "$(nvcc_major "$candidate")" = "$TORCH_CUDA_MAJOR" ]; then
    NVCC="$(readlink -f "$candidate")"
    break
  fi
done
if [ -z "$NVCC" ]; then
  echo "no installed nvcc of CUDA $TORCH_CUDA_MAJOR: installing the nvidia-cuda-nvcc wheel"
  if [ "$TORCH_CUDA_MAJOR" -ge 13 ]; then WHEEL="nvidia-cuda-nvcc==$TORCH_CUDA_MAJOR.*"; else WHEEL="nvidia-cuda-nvcc-cu$TORCH_CUDA_MAJOR"; fi
  "$PY" -m pip install -q "$WHEEL"
  NVCC="$(find "$VENV" -path '*/bin/nvcc' -type f | head -n1)"
fi
# A wrapper script (e.g. /usr/local/bin/nvcc) would make torch guess CUDA_HOME=/usr/local.
# Some layouts (/usr/local/cuda-13.0/bin/nvcc wrappers) resolve only through their content.
if head -c 2 "$NVCC" | grep -q '#!'; then
  NVCC="$(sed -n 's/^exec \([^ ]*nvcc\).*/\1/p' "$NVCC")"
fi
export CUDA_HOME="$(dirname "$(dirname "$NVCC")")"
export PATH="$CUDA_HOME/bin:$PATH"
echo "nvcc $NVCC (CUDA_HOME=$CUDA_HOME)"
"$NVCC" --version | tail -n 2

step "3/6 copy the sources to $BUILD_DIR (tracked + untracked, not ignored)"
rm -rf "$BUILD_DIR"
mkdir -p "$BUILD_DIR"
(cd "$ROOT" && git ls-files -co --exclude-standard -z | xargs -0 -I{} cp --parents {} "$BUILD_DIR"/ 2>/dev/null || true)
rm -f "$BUILD_DIR"/ann_kernels/_C*.so

step "4/6 build with CUDA (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, $ANN_KERNELS_MAX_JOBS job(s))"
START=$(date +%s)
(cd "$BUILD_DIR" && "$PY" setup.py build_ext --inplace 2>&1 | grep -v -E '^(copying|creating|running) ' ) \
  || { echo "FAIL: the CUDA build failed"; exit 3; }
SO="$(ls "$BUILD_DIR"/ann_kernels/_C*.so)"
echo "built $SO in $(( $(date +%s) - START )) s ($(du -h "$SO" | cut -f1))"

step "5/6 what the binary holds"
ldd "$SO" | grep -E 'cuda|c10|torch' | sed 's/ (0x.*//' || true  # libtorch*: found at import (torch loads them first)
if [ -x "$CUDA_HOME/bin/cuobjdump" ]; then
  "$CUDA_HOME/bin/cuobjdump" --list-elf "$SO" | sed 's/.*\(sm_[0-9a-z]*\).*/embedded cubin: \1/' | sort | uniq -c
else  # a minimal toolkit without cuobjdump: the fat binary section and the arch names in it
  FATBIN_HEX="$(objdump -h "$SO" | awk '$2 == ".nv_fatbin" {print $3}')"
  echo ".nv_fatbin section: $(( 16#${FATBIN_HEX:-0} )) bytes"
  strings -a "$SO" | grep -oE '\bsm_[0-9]+a?\b' | sort | uniq -c | sed 's/^/arch tag in the binary: /'
fi

step "6/6 import as far as it gets without a driver"
cd "$BUILD_DIR"
ANN_KERNELS_REQUIRE_EXT=1 "$PY" - <<'EOF'
import sys
import torch
print("a. torch", torch.__version__, "| torch.cuda.is_available():", torch.cuda.is_available(),
      "| device count:", torch.cuda.device_count())
import ann_kernels._C as ext  # noqa: E402  (loads libtorch_cuda / libcudart symbols)
print("b. imported", ext.__file__)
import ann_kernels  # noqa: E402
print("c. ann_kernels.HAS_CPP_EXT =", ann_kernels.HAS_CPP_EXT)
failed = False
for key in ("CPU", "CUDA", "Autograd"):
    ops = sorted(n for n in torch._C._dispatch_get_registrations_for_dispatch_key(key) if n.startswith("ann_kernels::"))
    print(f"d. ann_kernels ops with a {key} kernel: {ops}")
if not torch._C._dispatch_has_kernel_for_dispatch_key("ann_kernels::early_exit_step", "CUDA"):
    print("FAIL: the CUDA kernel of early_exit_step did not register")
    failed = True
# The CPU kernels of the CUDA build work as in the CPU build.
logits = torch.tensor([[4.0, 0.0], [0.0, 0.1]])
from ann_kernels.ops.early_exit import early_exit_step
buffers = (torch.full((2,), -1), torch.full((2,), -1), torch.zeros(2))
result = early_exit_step(logits, torch.arange(2), None, *buffers, threshold=0.9, criterion="max_prob")
print("e. CPU early_exit_step through the CUDA build: survivors =", result.survivor_index.tolist(), "(expected [1])")
try:
    torch.zeros(1, device="cuda")
    print("f. a CUDA tensor was created: there IS a driver/GPU here; run scripts/gpu_check.sh")
except Exception as error:  # no driver: expected here
    print("f. first CUDA allocation fails as expected without a driver:", type(error).__name__,
          str(error).strip().splitlines()[0][:160])
sys.exit(1 if failed else 0)
EOF
echo "OK: built against $("$PY" -c 'import torch; print(torch.__version__)') and imported with the CUDA kernel registered"

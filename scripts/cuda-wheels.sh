#!/usr/bin/env bash
# Installs NVIDIA's PyPI wheels that compile and check kernels without a CUDA toolkit:
#   nvidia-cuda-nvrtc-cu12    libnvrtc (kernels/*.cu -> PTX, used by build.rs)
#   nvidia-cuda-runtime-cu12  headers such as cuda_fp16.h
#   nvidia-cuda-nvcc-cu12     ptxas (build.rs: the sm_90 machine code; tests/ptx.rs: sm_80 and sm_90)
#   nvidia-cuda-nvdisasm      nvdisasm (tests/ptx.rs reads the GEMM k-loops' SASS; CUDA 13's,
#                             the only one on PyPI: it reads CUDA 12.9's sm_90 cubins)
# into .cuda/ (git-ignored), then prints the environment to use:
#   eval "$(scripts/cuda-wheels.sh)"
# build.rs also finds .cuda/ (NVRTC and ptxas) on its own, so the exports are only needed for
# tools outside cargo. Re-running is cheap: installed wheels are kept.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dest="$root/.cuda"
# Pinned: NVRTC 12.9 PTX (ISA 8.8) loads on drivers >= 575; newer NVRTC needs newer drivers.
pkgs=(nvidia-cuda-nvrtc-cu12==12.9.86 nvidia-cuda-runtime-cu12==12.9.79 nvidia-cuda-nvcc-cu12==12.9.86
  nvidia-cuda-nvdisasm==13.5.37)
if [ ! -f "$dest/.installed" ] || [ "$(cat "$dest/.installed")" != "${pkgs[*]}" ]; then
  python3 -m pip install --quiet --disable-pip-version-check --no-deps --upgrade --target "$dest" "${pkgs[@]}" >&2
  echo "${pkgs[*]}" > "$dest/.installed"
fi
echo "export PTXGRAD_CUDA_WHEELS=\"$dest/nvidia\""
echo "export LD_LIBRARY_PATH=\"$dest/nvidia/cuda_nvrtc/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}\""
echo "export PTXAS=\"$dest/nvidia/cuda_nvcc/bin/ptxas\""
echo "export NVDISASM=\"$dest/nvidia/cu13/bin/nvdisasm\""

#!/usr/bin/env bash
# Every GPU path once, in a few minutes, on a machine with a CUDA device and PyTorch installed:
# the `gpu` tests (offload copy stream and gradients, native FP8 GEMMs, CUDA snapshot capture,
# the quantize kernels on the device), the offload engine on the GPU (24 layers, no DeepSpeed)
# and the quantize throughput on the device. Figures and logs go to $GPU_CHECK_DIR
# (default runs/gpu_check).
#
# A machine without network that lacks a package stalwart needs (pydantic and its parts, in
# most PyTorch images) takes wheels from .whl/: `make gpu-wheels` downloads them for
# Python 3.12 on x86-64 (PYTHON_VERSION=3.11 ... to change).
#
#   bash bench/gpu_check.sh            # python3 from PATH
#   PYTHON=/path/to/python bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DIR=${GPU_CHECK_DIR:-runs/gpu_check}
mkdir -p "$DIR"
if ! "$PYTHON" -c "import pydantic" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/stalwart-site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/stalwart-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
status=0
step() {  # name, command...: run, log to $DIR/name.log, remember a failure
  local name=$1
  shift
  echo "== $name: $*"
  local started=$SECONDS
  "$@" 2>&1 | tee "$DIR/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - started)) s"
  [ "$rc" = 0 ] || status=1
}
step device "$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; \
p = torch.cuda.get_device_properties(0); \
print(torch.__version__, p.name, f'{p.total_memory / 2**30:.0f} GiB', 'capability', \
torch.cuda.get_device_capability(0))"
[ "$status" = 0 ] || exit 1
step tests "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider -o addopts= \
  tests/offload/test_engine_cuda.py tests/quant tests/snapshot/test_agent.py \
  tests/snapshot/test_state.py tests/data/test_sampler.py
step offload "$PYTHON" bench/offload.py --layers 24 --steps 3 --skip-deepspeed --budget-gb 2.0 \
  --nvme-root "$DIR/offload-nvme" --json "$DIR/offload.json"
rm -rf "$DIR/offload-nvme"
step quant "$PYTHON" bench/quant.py --parts throughput --repeats 5 --json "$DIR/quant.json"
exit $status

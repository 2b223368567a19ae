#!/usr/bin/env bash
# Device run 1 (issue #12): the driver on CUDA. Wheels of torchdeq travel in .whl.
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_driver.py -x 2>&1 | tail -4 | tee $OUT/pytest.log
timeout 300 python3 benchmarks/gpu.py --sections solvers --out $OUT/gpu.json 2>&1 | tee $OUT/gpu_solvers.log

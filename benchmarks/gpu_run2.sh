#!/usr/bin/env bash
# Device run 2: the CUDA tests of the driver, then every section of benchmarks/gpu.py.
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_driver.py 2>&1 | tail -6 | tee $OUT/pytest.log
cp benchmarks/results/gpu.json $OUT/gpu.json
timeout 430 python3 benchmarks/gpu.py --out $OUT/gpu.json 2>&1 | grep -v "^W1126\|Warning\|warn(" | tee $OUT/gpu.log

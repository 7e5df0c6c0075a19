#!/usr/bin/env bash
# Everything this project runs on the GPU machine: GPU tests, kernel benchmarks and the update
# kernels' launch-configuration sweep, transition and overhead benchmarks, and (with ACCURACY=1;
# the data folder copied to .data and carried) the accuracy study: six tasks of at most about
# 5 minutes each on one H200 (`ACCURACY_TASKS="sotu-llama kjv-gpt-recover"` picks some; the
# figures need matplotlib, installed here if missing). Logs and JSON go to $OUT (the device tool's
# output folder) and benchmarks/results. The device tool limits one command to 10 minutes: run
# the parts as separate calls there (each line below is one, each accuracy task one); a task cut
# short keeps its finished runs, and RESUME=1 on the same call trains only the missing ones.
set -u -o pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"
mkdir -p "$out" benchmarks/results
export PYTHONUNBUFFERED=1
python3 -m pip install -q -e . --no-deps --no-build-isolation >"$out/install.log" 2>&1 || cat "$out/install.log"
status=0
python3 -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.log" | tail -15 || status=1
python3 benchmarks/kernels.py --out benchmarks/results/kernels.json 2>&1 | tee "$out/kernels.log" | tail -30 || status=1
python3 -m benchmarks.tune_updates --out benchmarks/results/tune_updates.json 2>&1 | tee "$out/tune_updates.log" | tail -5 || status=1
python3 -m benchmarks.transitions --out benchmarks/results/transitions.json 2>&1 | tee "$out/transitions.log" | tail -30 || status=1
python3 benchmarks/overhead.py --out benchmarks/results/overhead.json "$@" 2>&1 | tee "$out/overhead.log" | tail -40 || status=1
if [ "${ACCURACY:-0}" = 1 ]; then
  python3 -c "import matplotlib" 2>/dev/null || python3 -m pip install -q matplotlib >"$out/matplotlib.log" 2>&1
  for task in ${ACCURACY_TASKS:-fmnist-mlp fmnist-vit fmnist-cnn kjv-gpt sotu-llama kjv-gpt-recover}; do
    python3 -m benchmarks.accuracy --task "$task" --data .data --workers 12 ${RESUME:+--resume} \
      --out "benchmarks/results/accuracy-$task.json" 2>&1 | tee "$out/accuracy-$task.log" | tail -30 || status=1
  done
fi
cp benchmarks/results/*.json benchmarks/results/*.png "$out/" 2>/dev/null
exit $status

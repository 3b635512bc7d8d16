#!/usr/bin/env bash
# The checks and timings that need a CUDA GPU, in one go (docs/gpu_study.md, checklist step 2): the CUDA tests,
# the GPU study's cost per run (float32 and bf16), the aggregator tables and the training-step table on the GPU.
# Each step has a time limit, keeps its log in OUTPUT_DIR and goes on when an earlier step failed; the tables are
# spliced into docs/benchmarks.md and docs/gpu_study.md. Exits non-zero when any step failed.
#
# Usage: scripts/gpu_checks.sh [OUTPUT_DIR]       (default runs/gpu_checks of the repository; PYTHON picks the
# interpreter; OPINIONPOOL_COMMIT names the commit in the tables where the copy's .git is missing or stale)
set -u
out=${1:-}
case $out in
    "") out=$(cd "$(dirname "$0")/.." && pwd)/runs/gpu_checks ;;
    /*) ;;
    *) out=$PWD/$out ;;  # relative to where the script was called from
esac
cd "$(dirname "$0")/.."
mkdir -p "$out"
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
failed=()

check() {  # check NAME SECONDS COMMAND...: run COMMAND with a time limit, its output in OUTPUT_DIR/NAME.log
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    echo "== $name (at most ${limit} s): $*"
    timeout -k 30 "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$out/$name.log"
    echo "== $name: exit status $rc after $((SECONDS - start)) s"
    [ "$rc" -eq 0 ] || failed+=("$name")
}

"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, \
torch.version.cuda, torch.cuda.get_device_name())" || exit 1
check cuda_tests 360 "$PYTHON" -m pytest -q -m cuda -p no:cacheprovider tests/
check study_cost 75 "$PYTHON" benchmarks/bench_mvae.py --sweep polymnist-gpu --repeats 10 --docs docs/gpu_study.md
check aggregators 90 "$PYTHON" benchmarks/bench_aggregators.py --device cuda --rounds 30 \
    --docs docs/benchmarks.md --table bench_aggregators_cuda
check training_steps 90 "$PYTHON" benchmarks/bench_mvae.py --device cuda --batch 256 --latent 512 \
    --docs docs/benchmarks.md --table bench_mvae_cuda
check aggregators_fused 150 "$PYTHON" benchmarks/bench_aggregators.py --device cuda --fused --only "hellinger fused" \
    --no-overlapping --shapes 256,5,512 256,10,512 --rounds 20 --docs docs/benchmarks.md \
    --table bench_aggregators_cuda_fused
check study_cost_bf16 60 "$PYTHON" benchmarks/bench_mvae.py --sweep polymnist-gpu --repeats 10 \
    --set 'extra_overrides=[train.precision=bf16]' --docs docs/gpu_study.md --table study_cost_bf16
if [ ${#failed[@]} -gt 0 ]; then
    echo "gpu_checks: failed: ${failed[*]} (logs in $out)"
    exit 1
fi
echo "gpu_checks: every check passed (logs in $out)"

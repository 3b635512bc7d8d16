#!/usr/bin/env bash
# The checks and timings that need a CUDA GPU (docs/gpu_study.md, checklist step 2): the GPU study's cost per run
# (float32 and bf16), the aggregator tables and the training-step table on the GPU, and the CUDA tests. Each step has
# a time limit, keeps its log in OUTPUT_DIR and goes on when an earlier step failed; the tables are spliced into
# docs/benchmarks.md and docs/gpu_study.md, and both pages are copied into OUTPUT_DIR after every step (a lent
# machine sends back only that folder). Exits non-zero when any step failed.
#
# Usage: scripts/gpu_checks.sh [OUTPUT_DIR [STEP ...]]
#   OUTPUT_DIR  default runs/gpu_checks of the repository; on a lent device machine, $OUT (what comes back)
#   STEP        some of the steps below, in the order given (default: all, timings first): the steps' limits add up
#               to more than one 10-minute device command, so run them in two calls, e.g.
#               scripts/gpu_checks.sh "$OUT" study_cost aggregators training_steps aggregators_fused study_cost_bf16
#               scripts/gpu_checks.sh "$OUT" cuda_tests
# PYTHON picks the interpreter; OPINIONPOOL_COMMIT names the commit in the tables where the copy's .git is missing
# or stale. Packages the machine lacks (its image has no omegaconf) are installed from wheels in .whl/ when
# present (see the message below for how to fetch them).
set -u
out=${1:-}
case $out in
    "") out=$(cd "$(dirname "$0")/.." && pwd)/runs/gpu_checks ;;
    /*) ;;
    *) out=$PWD/$out ;;  # relative to where the script was called from
esac
shift $(( $# > 0 ? 1 : 0 ))
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
# the steps in their default order and each one's limit in seconds (their commands: run_step below)
steps=(study_cost aggregators training_steps aggregators_fused study_cost_bf16 cuda_tests)
declare -A limit=([study_cost]=75 [aggregators]=90 [training_steps]=90 [aggregators_fused]=150
                  [study_cost_bf16]=75 [cuda_tests]=360)
chosen=("$@")
[ ${#chosen[@]} -gt 0 ] || chosen=("${steps[@]}")
for name in "${chosen[@]}"; do  # a misspelt step is named before any work
    [ -n "${limit[$name]:-}" ] || { echo "gpu_checks: unknown step '$name'; the steps are: ${steps[*]}"; exit 2; }
done
mkdir -p "$out" || exit 1
needed="import omegaconf, tqdm, pytest, matplotlib, PIL"
if ! "$PYTHON" -c "$needed" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
    site=$(mktemp -d)
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        .whl/*.whl || exit 1
    export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! "$PYTHON" -c "$needed"; then
    echo "gpu_checks: a package is missing (above). Without internet, carry wheels: on a machine with the package"
    echo "registry, in the repository: python3 -m pip download --no-deps --only-binary=:all: -d .whl \\"
    echo "  omegaconf==2.4.0 antlr4-python3-runtime==4.13.2 (and any other missing one), then name .whl in the"
    echo "  device call's carry"
    exit 1
fi
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, \
torch.version.cuda, torch.cuda.get_device_name())" || exit 1
failed=()

run_step() {  # run_step NAME: its command with its time limit, the output in OUTPUT_DIR/NAME.log
    local name=$1 start=$SECONDS
    local -a command
    case $name in
        study_cost) command=("$PYTHON" benchmarks/bench_mvae.py --sweep polymnist-gpu --repeats 10
                             --docs docs/gpu_study.md) ;;
        aggregators) command=("$PYTHON" benchmarks/bench_aggregators.py --device cuda --rounds 30
                              --docs docs/benchmarks.md --table bench_aggregators_cuda) ;;
        training_steps) command=("$PYTHON" benchmarks/bench_mvae.py --device cuda --batch 256 --latent 512
                                 --docs docs/benchmarks.md --table bench_mvae_cuda) ;;
        aggregators_fused) command=("$PYTHON" benchmarks/bench_aggregators.py --device cuda --fused
                                    --only "hellinger fused" --no-overlapping --shapes 256,5,512 256,10,512
                                    --rounds 20 --docs docs/benchmarks.md --table bench_aggregators_cuda_fused) ;;
        study_cost_bf16) command=("$PYTHON" benchmarks/bench_mvae.py --sweep polymnist-gpu --repeats 10
                                  --set 'extra_overrides=[train.precision=bf16]' --docs docs/gpu_study.md
                                  --table study_cost_bf16) ;;
        cuda_tests) command=("$PYTHON" -m pytest -q -m cuda -p no:cacheprovider tests/) ;;
    esac
    echo "== $name (at most ${limit[$name]} s): ${command[*]}"
    timeout -k 10 "${limit[$name]}" "${command[@]}" >"$out/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$out/$name.log"
    echo "== $name: exit status $rc after $((SECONDS - start)) s"
    [ "$rc" -eq 0 ] || failed+=("$name")
    cp docs/benchmarks.md docs/gpu_study.md "$out/"  # the pages as spliced so far
}

for name in "${chosen[@]}"; do
    run_step "$name"
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "gpu_checks: failed: ${failed[*]} (logs and pages in $out)"
    exit 1
fi
echo "gpu_checks: every step passed: ${chosen[*]} (logs and pages in $out)"

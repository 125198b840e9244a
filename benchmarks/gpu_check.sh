#!/usr/bin/env bash
# The checks that need a GPU, in one run of a few minutes: the CUDA tests, the attention benchmark at the
# full Wan 2.1 1.3B shape, TSA's striped tier, UltraViCo's backends and one forward of the whole Wan 2.1
# 1.3B transformer at 480p and 4x its trained length (321 frames, bf16). Every figure goes to one file,
# with the card's name and torch's version at its top.
#
#   bash benchmarks/gpu_check.sh [--out FILE] [--dry-run]
#
# --dry-run: on a machine without a GPU, check that every step starts (the scripts' options, the tests'
# collection, the device query) without running them; the file then says so.
# Run from the repository root, in the environment `bash scripts/dev test` sets up (or any with freeloc[dev]).
set -uo pipefail

OUT="gpu-check.txt"
DRY=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --out) OUT="$2"; shift 2 ;;
        --dry-run) DRY=1; shift ;;
        -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check.sh: unknown option $1 (accepted: --out FILE, --dry-run)" >&2; exit 2 ;;
    esac
done

PY="${PYTHON:-python}"
if [[ -x .venv/bin/python && -z "${PYTHON:-}" ]]; then PY=.venv/bin/python; fi
FAILED=0

step() {  # step NAME COMMAND...: runs COMMAND, its output into $OUT, and says how it ended
    local name="$1"; shift
    printf '\n==> %s: %s\n' "$name" "$*" | tee -a "$OUT"
    local t0=$SECONDS
    if "$@" 2>&1 | tee -a "$OUT"; then
        printf '==> %s: done in %d s\n' "$name" $((SECONDS - t0)) | tee -a "$OUT"
    else
        printf '==> %s: FAILED after %d s\n' "$name" $((SECONDS - t0)) | tee -a "$OUT"
        FAILED=1
    fi
}

: > "$OUT"
"$PY" - <<'PYTHON' | tee -a "$OUT"
import torch
card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
print(f"device: {card}; torch {torch.__version__}; CUDA {torch.version.cuda}")
PYTHON

if [[ $DRY -eq 1 ]]; then
    echo "dry run: every step is checked to start, nothing is timed" | tee -a "$OUT"
    step "CUDA tests (collected)" "$PY" -m pytest tests/test_cuda.py -q --collect-only -p no:cacheprovider
    step "attention benchmark (options)" "$PY" benchmarks/attention.py --help
    step "striped tier (options)" "$PY" benchmarks/striped_tier.py --help
    step "pipeline benchmark (options)" "$PY" benchmarks/pipeline.py --help
    step "UltraViCo benchmark (options)" "$PY" benchmarks/ultravico.py --help
else
    if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "gpu_check.sh: no CUDA device here; use --dry-run to check that the steps start" | tee -a "$OUT" >&2
        exit 1
    fi
    step "CUDA tests" "$PY" -m pytest tests/test_cuda.py -q -p no:cacheprovider
    step "attention benchmark, Wan 1.3B shape" "$PY" benchmarks/attention.py --shapes none --reps 3 \
        --variants flex,tiles128,prescale
    step "striped tier" "$PY" benchmarks/striped_tier.py --reps 3
    step "UltraViCo at the Wan 1.3B shape (flex, chunked, reference)" "$PY" benchmarks/ultravico.py --reps 3
    # the whole 30-layer model at 480 x 832, 321 frames (126,360 tokens): a few seconds a forward
    step "pipeline benchmark, Wan 2.1 1.3B at 480p x 321 frames" "$PY" benchmarks/pipeline.py --shape gpu --reps 2
fi
echo | tee -a "$OUT"
if [[ $FAILED -eq 0 ]]; then echo "gpu_check.sh: every step passed; figures in $OUT" | tee -a "$OUT"; fi
if [[ $FAILED -ne 0 ]]; then echo "gpu_check.sh: a step failed; see $OUT" | tee -a "$OUT"; fi
exit $FAILED

#!/usr/bin/env bash
# One command for the first minutes on a CUDA machine: install what is missing, run the CUDA tests,
# the throughput benchmark and a short Amata-vs-PGD training run, and write one JSON summary.
#
#   scripts/device_check.sh                 # CUDA: the real sizes, about 8 minutes at most
#   scripts/device_check.sh --cpu           # the same stages at tiny sizes on the CPU (a rehearsal)
#   scripts/device_check.sh --out FILE      # where the summary goes (default: device_check.json)
#
# The machine is assumed to have only torch, torchvision and timm (and their numpy, scikit-learn,
# tqdm, pyyaml) and no internet.  Everything else comes from wheels in .whl/ (gitignored), which
# you prepare on a machine with internet before copying the tree over (see docs/benchmarks.md):
#
#   pip download --no-deps -d .whl "hydra-core>=1.3,<1.4" "omegaconf>=2.3,<2.4" \
#       "antlr4-python3-runtime==4.9.3" pytest iniconfig pluggy packaging
#
# They are installed with --no-index into a private folder (nothing system-wide changes) and the
# project runs from src/ through PYTHONPATH, so no network and no `pip install -e` is needed.
#
# Stages (each under its own timeout, the whole run under DEADLINE_S; a stage that fails or times
# out is recorded in the summary and the next one still runs):
#   install   import hydra/omegaconf/pytest, else install them from .whl/
#   pytest    pytest -m cuda on the test files that carry the cuda marker
#   bench_eager_*     PGD-10 PreActResNet18 3x32x32, ours vs the reference loop, batch 128 and
#                     512, fp32 and bf16
#   train_*           3 epochs of Amata (K 2->10) and of PGD-10 on CIFAR10-shaped synthetic data
#   bench_compiled_*  the same cases with the compiled step and the eager one timed side by side
#                     (--compile both), last because compilation takes the longest
# The exit status is 0 when every stage passed, 1 otherwise; the summary is written either way.
set -uo pipefail

# The whole script is one block, parsed before it runs: editing the file mid-run cannot derail it.
{
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
MODE=cuda
OUT=$ROOT/device_check.json
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu) MODE=cpu ;;
        --out) OUT=$(realpath -m "$2"); shift ;;
        -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
        *) echo "device_check.sh: unknown argument '$1' (use --cpu, --out FILE)" >&2; exit 2 ;;
    esac
    shift
done

PY=${PYTHON:-python3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/device_check.XXXXXX")
STAGES=$WORK/stages.tsv
: > "$STAGES"
START=$(date +%s)
if [ "$MODE" = cuda ]; then DEADLINE_S=${DEADLINE_S:-470}; else DEADLINE_S=${DEADLINE_S:-1800}; fi
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
echo "device_check: mode=$MODE, logs in $WORK, summary -> $OUT" >&2

# stage NAME CAP_S CMD...: run CMD under min(CAP_S, time left), log to $WORK/NAME.log.
stage() {
    local name=$1 cap=$2
    shift 2
    local left=$((START + DEADLINE_S - $(date +%s)))
    local limit=$((cap < left ? cap : left))
    if [ "$limit" -lt 5 ]; then
        printf '%s\t%s\t%s\t%s\n' "$name" skipped 0 "$limit" >> "$STAGES"
        echo "device_check: $name skipped (no time left)" >&2
        return 0
    fi
    local t0 rc
    t0=$(date +%s%N)
    timeout --kill-after=10 "$limit" "$@" > "$WORK/$name.log" 2>&1
    rc=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((($(date +%s%N) - t0) / 1000000))e-3" "$limit" \
        >> "$STAGES"
    echo "device_check: $name rc=$rc" >&2
}

# ---------------------------------------------------------------- install
install_missing() {
    if "$PY" -c "import hydra, omegaconf, pytest" 2>/dev/null; then
        echo "hydra-core, omegaconf and pytest already importable"
        return 0
    fi
    if ! ls "$ROOT"/.whl/*.whl > /dev/null 2>&1; then
        echo "missing packages and no wheels in .whl/: see the header of scripts/device_check.sh"
        return 1
    fi
    "$PY" -m pip install -q --no-index --no-deps --target "$WORK/site" "$ROOT"/.whl/*.whl
}
export PY ROOT WORK
export -f install_missing
stage install 30 bash -c install_missing
export PYTHONPATH="$WORK/site:$PYTHONPATH"
"$PY" -c "import torch, sys; print(torch.__version__, torch.cuda.is_available())" \
    > "$WORK/torch.txt" 2>&1

# ---------------------------------------------------------------- pytest -m cuda
mapfile -t CUDA_TESTS < <(grep -l "pytest.mark.cuda" tests/test_*.py)
stage pytest 80 "$PY" -m pytest -q -m cuda -p no:cacheprovider "${CUDA_TESTS[@]}" \
    --junitxml="$WORK/pytest.xml"

# ---------------------------------------------------------------- benchmark, train
if [ "$MODE" = cuda ]; then
    BATCHES=(128 512); MODEL=preactresnet18; ITERS=(--iters 20 --warmup 3 --rounds 4); STEPS=10
    EAGER_CAP=25 COMPILED_CAP=60 DEVICE=(--device cuda)
    TRAIN=(model=preactresnet18 dataset.num_train=5000 dataset.num_test=1000 batch_size=128
           eval.subset=500 dataset.threat.steps=10 device=cuda)
    TRAIN_CAP=40
else
    # The CPU is a rehearsal of the same code paths; inductor compiles dominate its time.
    BATCHES=(8); MODEL=lenet; ITERS=(--iters 2 --warmup 1 --rounds 1); STEPS=2
    EAGER_CAP=300 COMPILED_CAP=600 DEVICE=(--device cpu)
    TRAIN=(model=lenet dataset.num_train=64 dataset.num_test=32 batch_size=16 eval.subset=32
           dataset.threat.steps=3 device=cpu)
    TRAIN_CAP=300
fi
# bench KIND CAP COMPILE: every batch x precision case; eager first (the ours-vs-reference figures
# even if compilation is slow), the 3-epoch runs next, the compiled step (+ eager again, side by
# side in the same rounds) last, in whatever time is left.
bench() {
    local kind=$1 cap=$2 compile=$3 batch precision
    for batch in "${BATCHES[@]}"; do
        for precision in fp32 bf16; do
            stage "bench_${kind}_${batch}_${precision}" "$cap" "$PY" scripts/bench_throughput.py \
                --method pgd --model "$MODEL" --shape 3x32x32 --batch "$batch" --steps "$STEPS" \
                --precision "$precision" --compile "$compile" "${ITERS[@]}" "${DEVICE[@]}"
        done
    done
}
bench eager "$EAGER_CAP" off

# 3 epochs of Amata (K 2->10) and of PGD-10, CIFAR10-shaped synthetic data
for method in amata pgd; do
    stage "train_$method" "$TRAIN_CAP" "$PY" -m amata_runner.cli.train "method=$method" \
        dataset=synthetic dataset.channels=3 dataset.image_size=32 epochs=3 \
        dataset.threat.eps=0.03137 dataset.threat.step_size=0.00784 \
        eval.validation.size=0 save_best=false progress=false "${TRAIN[@]}" \
        "hydra.run.dir=$WORK/run_$method"
done

bench compiled "$COMPILED_CAP" both

# ---------------------------------------------------------------- summary
"$PY" - "$WORK" "$OUT" "$MODE" "$START" <<'EOF'
import json
import sys
import time
from pathlib import Path

work, out, mode, start = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])


def tail(name: str, lines: int = 15) -> str:
    path = work / f"{name}.log"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


stages = {}
for line in (work / "stages.tsv").read_text().splitlines():
    name, rc, seconds, limit = line.split("\t")
    status = "skipped" if rc == "skipped" else "ok" if rc == "0" else (
        "timeout" if rc in ("124", "137") else "failed")
    stages[name] = {"status": status, "rc": None if rc == "skipped" else int(rc),
                    "seconds": round(float(seconds), 1), "limit_s": int(limit)}
    if status != "ok":
        stages[name]["log_tail"] = tail(name)

bench = []
for name in sorted(stages):
    if name.startswith("bench_") and (work / f"{name}.log").exists():
        for line in (work / f"{name}.log").read_text().splitlines():
            if line.startswith("{"):
                bench.append(json.loads(line))

train = {}
for method in ("amata", "pgd"):
    path = work / f"run_{method}" / "summary.json"
    if path.exists():
        summary = json.loads(path.read_text())
        final = summary.get("final") or {}
        keys = ("train_seconds", "epochs", "precision", "forward_passes", "backward_passes")
        train[method] = {k: summary.get(k) for k in keys}
        train[method]["test_examples"] = final.get("examples")
        train[method]["clean_accuracy"] = final.get("clean_accuracy")
        train[method]["robust_accuracy"] = final.get("robust_accuracy")
if "amata" in train and "pgd" in train and train["pgd"].get("train_seconds"):
    train["amata_over_pgd_train_seconds"] = round(
        train["amata"]["train_seconds"] / train["pgd"]["train_seconds"], 4)

pytest_tail = tail("pytest", 3)
result = {
    "mode": mode,
    "torch": (work / "torch.txt").read_text().strip(),
    "wall_seconds": round(time.time() - start, 1),
    "all_ok": all(s["status"] == "ok" for s in stages.values()),
    "stages": stages,
    "pytest_cuda": pytest_tail,
    "bench": bench,
    "train": train,
    "logs": str(work),
}
out.write_text(json.dumps(result, indent=2) + "\n")
print(json.dumps({k: result[k] for k in ("mode", "wall_seconds", "all_ok")}))
sys.exit(0 if result["all_ok"] else 1)
EOF
exit $?
}

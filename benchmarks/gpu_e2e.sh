#!/usr/bin/env bash
# The whole pipeline once on one NVIDIA GPU, in minutes, printing every figure. Steps, in order:
#
#   env, install      the python that has torch + deepspeed ($PYTHON, ./.venv or python3); mnemo from this
#                     checkout: installed, else `pip install -e .` offline into a --system-site-packages
#                     venv, else PYTHONPATH (nothing is downloaded)
#   mfu               benchmarks/gpu_check.sh: `medium` with and without memory (STM + one kNN layer):
#                     tokens/s, their ratio, MFU against 989 TFLOP/s (dense bf16 of an H100/H200)
#   prepare           `mnemo prepare` of a generated corpus (the python's own standard-library sources)
#   train_zero2_kill  `mnemo train` of `small` with memory (STM + a kNN layer), bf16, ZeRO 2, SIGKILLed
#                     between two checkpoints
#   resume_zero2      the same command again: resumes after the last checkpoint and finishes
#   train_zero3       the same model at ZeRO 3, compiled (model.compile=true), with passkey episodes and an
#                     evaluation half-way (no-grad forwards of the compiled model)
#   eval              `mnemo eval`: loss by position, passkey retrieval
#   generate, export  `mnemo generate`, `mnemo export`
#
# One line per step, `ok <step> <figure>` or `failed <step> <reason>`, then a summary.
# Every step runs (a failed one does not stop the others) under its own timeout,
# and no step starts after GPU_E2E_BUDGET_S (GPU: 450 s); the exit status is 1
# if any step failed. Logs: <work>/logs/<step>.log.
#
#   bash benchmarks/gpu_e2e.sh                  # one GPU
#   bash benchmarks/gpu_e2e.sh --cpu            # dry run on CPU: debug size, gloo, every step in seconds
#   bash benchmarks/gpu_e2e.sh --work DIR       # data, runs and logs in DIR (default: a new temporary one)
#   bash benchmarks/gpu_e2e.sh --work DIR --only eval,mfu   # again, only these steps (on DIR's data and runs)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
REPO=$PWD
SELF=$REPO/benchmarks/$(basename "$0")

if [ "${1:-}" = "--step" ]; then  # one step, run by the driver at the end under `timeout`
    STEP=$2
else
    STEP=""
    CPU=0
    WORK=""
    ONLY=""
    while [ $# -gt 0 ]; do
        case $1 in
            --cpu) CPU=1 ;;
            --work) WORK=${2:?--work needs a directory}; shift ;;
            --only) ONLY=,${2:?--only needs step names},; shift ;;
            -h|--help) sed -n '2,26p' "$SELF" | sed 's/^# \{0,1\}//'; exit 0 ;;
            *) echo "gpu_e2e: unknown argument: $1 (see --help)" >&2; exit 2 ;;
        esac
        shift
    done
    if [ -n "$ONLY" ]; then  # a step name that does not exist is a typo, not an empty run
        for s in ${ONLY//,/ }; do
            case " env install prepare train_zero2_kill resume_zero2 train_zero3 eval generate export mfu " in
                *" $s "*) ;;
                *) echo "gpu_e2e: --only: no step named $s" >&2; exit 2 ;;
            esac
        done
    fi
    WORK=${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/mnemo-gpu-e2e.XXXXXX")}
    mkdir -p "$WORK/logs" || exit 2
    WORK=$(cd "$WORK" && pwd)
    export CPU WORK REPO
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$([ "$CPU" = 1 ] && echo 1 || echo 4)}
    export PYTHONUNBUFFERED=1
    unset MLFLOW_TRACKING_URI
    if [ "$CPU" = 1 ]; then
        export DS_ACCELERATOR=cpu CUDA_VISIBLE_DEVICES=""
    fi
fi

# ---- sizes: a GPU run measures, a CPU run only walks every code path
if [ "$CPU" = 1 ]; then
    CONFIG=$REPO/configs/debug.yaml; N_FILES=40; VOCAB=512; WORKERS=2
    STEPS=4; KILL_STEPS=20; KILL_INTERVAL=10; KILL_AT=12
    SIZE_OVERRIDES=(train.device=cpu tracking.enabled=false)  # MLflow's import alone is seconds of CPU
    # (a CPU run stays eager; the episodes' key sentence needs segments of 128 tokens)
    ZERO3_OVERRIDES=(model.segment_len=128)
    EVAL_ARGS=(--max-docs 1 --passkey-trials 1 --distances 1 --batch-size 2 --no-ablations --device cpu)
    GEN_ARGS=(--max-tokens 8 --device cpu)
    MFU_CMD=("$REPO/benchmarks/gpu_check.py" --cpu --size debug --vocab 512 --segment-len 32 --steps 1)
else
    CONFIG=$REPO/configs/small.yaml; N_FILES=400; VOCAB=4096; WORKERS=8
    STEPS=20; KILL_STEPS=60; KILL_INTERVAL=20; KILL_AT=25
    SIZE_OVERRIDES=(train.batch_size=8 train.warmup_steps=5 data.num_workers=2)
    ZERO3_OVERRIDES=()
    EVAL_ARGS=(--max-docs 8 --passkey-trials 8 --distances 1,4,16 --batch-size 8)
    GEN_ARGS=(--max-tokens 64)
    MFU_CMD=("$REPO/benchmarks/gpu_check.sh" --steps 15)
fi
DATA=$WORK/data
RUN2=$WORK/runs/zero2
RUN3=$WORK/runs/zero3
# Shared by every training run: bf16, memory as the config has it, a final eval of seconds.
COMMON=(model.dtype=bf16 data.path="$DATA" data.val_fraction=0.05 train.log_interval=5 eval.max_docs=4
        eval.passkey_trials=2 "eval.passkey_distances=[1]" "${SIZE_OVERRIDES[@]}")
# The same command for the killed ZeRO-2 run and its relaunch.
ZERO2=(train "$CONFIG" run.dir="$RUN2" zero.stage=2 train.max_steps="$KILL_STEPS"
       checkpoint.interval="$KILL_INTERVAL" "${COMMON[@]}")

py() { "$PY" "$@"; }
mnemo() { "$PY" -m mnemo "$@"; }
last_step() {  # the last step number in <run>/logs/steps.jsonl (0 if none)
    local f=$1/logs/steps.jsonl n=""
    [ -f "$f" ] && n=$(grep -o '"step": [0-9]*' "$f" | tail -n 1 | grep -o '[0-9]*$')
    echo "${n:-0}"
}
train_figure() {  # <run dir> <log>: loss first -> last, the last tok/s printed
    py - "$1" "$2" <<'EOF'
import json, re, sys
recs = []
for line in open(f"{sys.argv[1]}/logs/steps.jsonl"):
    try:
        recs.append(json.loads(line))
    except ValueError:  # a line cut by SIGKILL
        pass
corpus = [r for r in recs if r.get("kind") != "passkey" and "loss" in r]
tps = re.findall(r"tok/s (\d+)", open(sys.argv[2], errors="replace").read())
print(f"loss {corpus[0]['loss']:.3f} -> {corpus[-1]['loss']:.3f}, {tps[-1] if tps else '?'} tok/s")
EOF
}
bash_or_py() {  # gpu_check.sh (bash) or gpu_check.py (python)
    case $1 in *.sh) bash "$@" ;; *) "$PY" "$@" ;; esac
}

# ---------------------------------------------------------------- steps (each prints its figure last)
step_env() {
    py - <<'EOF'
import sys, torch
from importlib.metadata import version
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, deepspeed {version('deepspeed')}, {gpu}")
EOF
}

step_install() {
    if [ "$PY" = "$WORK/venv/bin/python" ] || (cd "$WORK" && "$PY" -c 'import mnemo.cli') 2>/dev/null; then
        echo "mnemo importable by $PY"
    elif "$PY" -m venv --system-site-packages "$WORK/venv" &&
         "$WORK/venv/bin/python" -m pip install --no-index --no-deps --no-build-isolation -q -e "$REPO" &&
         (cd "$WORK" && "$WORK/venv/bin/python" -c 'import mnemo.cli'); then
        echo "pip install -e (offline) into $WORK/venv"
    else
        echo "not installable offline: the next steps run mnemo from the checkout (PYTHONPATH)"
    fi
}

step_prepare() {
    rm -rf "$WORK/corpus" "$DATA"
    mkdir -p "$WORK/corpus"
    py - "$WORK/corpus" "$N_FILES" <<'EOF'
import glob, os, shutil, sys, sysconfig
files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "**", "*.py"), recursive=True))
files = [f for f in files if 2_000 < os.path.getsize(f) < 60_000][: int(sys.argv[2])]
for i, f in enumerate(files):
    shutil.copy(f, os.path.join(sys.argv[1], f"{i:05d}_{os.path.basename(f)}"))
EOF
    mnemo prepare --input "$WORK/corpus" --out "$DATA" --vocab-size "$VOCAB" --workers "$WORKERS" | tail -n 1
}

step_train_zero2_kill() {
    rm -rf "$RUN2"
    "$PY" -m mnemo "${ZERO2[@]}" >"$WORK/logs/zero2_killed.out" 2>&1 &
    local pid=$!
    while [ "$(last_step "$RUN2")" -lt "$KILL_AT" ]; do
        if ! kill -0 "$pid" 2>/dev/null; then
            wait "$pid"
            echo "the run ended (rc $?) before step $KILL_AT" >&2
            tail -n 5 "$WORK/logs/zero2_killed.out" >&2
            return 1
        fi
        sleep 0.1
    done
    pkill -KILL -P "$pid" 2>/dev/null  # a helper process of the run, if any, then the run itself
    kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
    local at latest
    at=$(last_step "$RUN2")
    latest=$(cat "$RUN2/checkpoints/latest" 2>/dev/null) || { echo "no checkpoint before the SIGKILL" >&2; return 1; }
    [ "$at" -lt "$KILL_STEPS" ] || { echo "finished ($at steps) before the SIGKILL landed" >&2; return 1; }
    echo "$latest" >"$WORK/zero2.latest"
    echo "SIGKILLed at step $at (latest checkpoint $latest); $(train_figure "$RUN2" "$WORK/logs/zero2_killed.out")"
}

step_resume_zero2() {
    local latest saved before first
    latest=$(cat "$WORK/zero2.latest") || return 1
    saved=$((10#${latest#step_}))
    before=$(wc -l <"$RUN2/logs/steps.jsonl")
    mnemo "${ZERO2[@]}" >"$WORK/logs/zero2_resumed.out" 2>&1 || {
        tail -n 5 "$WORK/logs/zero2_resumed.out" >&2; return 1; }
    first=$(tail -n +"$((before + 1))" "$RUN2/logs/steps.jsonl" | head -n 1 | grep -o '"step": [0-9]*' | grep -o '[0-9]*$')
    [ "$first" = "$((saved + 1))" ] || { echo "the relaunch started at step ${first:-?}, not $((saved + 1))" >&2; return 1; }
    [ "$(last_step "$RUN2")" = "$KILL_STEPS" ] || { echo "did not reach step $KILL_STEPS" >&2; return 1; }
    grep -q "resumed from .*$latest" "$WORK/logs/zero2_resumed.out" || { echo "no 'resumed from $latest' line" >&2; return 1; }
    echo "resumed at step $first after $latest, finished $KILL_STEPS; $(train_figure "$RUN2" "$WORK/logs/zero2_resumed.out")"
}

step_train_zero3() {
    rm -rf "$RUN3"
    # Compiled: the first forwards without gradients (the episodes' memory-filling segments, the evaluation
    # half-way and at the end) are where a compiled model with long-term memory once failed.
    mnemo train "$CONFIG" run.dir="$RUN3" zero.stage=3 train.max_steps="$STEPS" checkpoint.interval="$STEPS" \
        model.compile=true train.passkey.fraction=0.25 train.passkey.max_distance=1 eval.interval=$((STEPS / 2)) \
        "${COMMON[@]}" "${ZERO3_OVERRIDES[@]}" >"$WORK/logs/zero3.out" 2>&1 || {
        tail -n 5 "$WORK/logs/zero3.out" >&2; return 1; }
    [ "$(last_step "$RUN3")" = "$STEPS" ] || { echo "did not reach step $STEPS" >&2; return 1; }
    grep -q '"kind": "passkey"' "$RUN3/logs/steps.jsonl" || { echo "no passkey episode step" >&2; return 1; }
    echo "$STEPS steps (compiled, passkey episodes, eval at $((STEPS / 2))); $(train_figure "$RUN3" "$WORK/logs/zero3.out")"
}

step_eval() {
    mnemo eval "$RUN2" --data "$DATA" --json "$WORK/eval.json" "${EVAL_ARGS[@]}" || return 1
    py - "$WORK/eval.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
lbp = r["loss_by_position"]
first, last = list(lbp)[0], list(lbp)[-1]
pk = " ".join(f"D={d}:{a:.2f}" for d, a in r.get("passkey", {}).items())
print(f"loss {r['loss']:.3f} over {r['num_tokens']} tokens (by position: {first} {lbp[first]:.3f}, {last} "
      f"{lbp[last]:.3f}), passkey accuracy {pk or 'not run'}")
EOF
}

step_generate() {
    printf 'def main():\n    """Parse the arguments and' >"$WORK/prompt.txt"
    local t0=$SECONDS n
    mnemo generate "$RUN2" --prompt-file "$WORK/prompt.txt" --temperature 0 "${GEN_ARGS[@]}" \
        2>"$WORK/logs/generate.err" || { tail -n 5 "$WORK/logs/generate.err" >&2; return 1; }
    n=$(grep -o '([0-9]* tokens generated)' "$WORK/logs/generate.err" | grep -o '[0-9]*')
    [ "${n:-0}" -gt 0 ] || { echo "nothing generated" >&2; return 1; }
    echo
    echo "$n tokens in $((SECONDS - t0)) s (model load included)"
}

step_export() {
    rm -rf "$WORK/export"
    mnemo export "$RUN2" --out "$WORK/export" || return 1
    py - "$WORK/export" <<'EOF'
import json, math, os, struct, sys
f = os.path.join(sys.argv[1], "model.safetensors")
with open(f, "rb") as fh:  # safetensors: u64 header length, then a JSON header of dtypes and shapes
    header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
tensors = [v for k, v in header.items() if k != "__metadata__"]
n = sum(math.prod(t["shape"]) for t in tensors)
dtypes = "/".join(sorted({t["dtype"] for t in tensors}))
print(f"{n / 1e6:.1f}M parameters ({dtypes}), {os.path.getsize(f) / 2**20:.0f} MiB; "
      f"{' '.join(sorted(os.listdir(sys.argv[1])))}")
EOF
}

step_mfu() {
    PYTHON=$PY bash_or_py "${MFU_CMD[@]}" --json "$WORK/mfu.json" || return 1
    py - "$WORK/mfu.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
arms = []
for arm in ("none", "memory"):
    a = r[arm]
    mfu = "n/a (CPU)" if a["mfu"] is None else f"{a['mfu']:.1%}"
    arms.append(f"{arm} {a['tokens_per_s']:,.0f} tok/s MFU {mfu}")
print(f"{r['none']['size']}: {', '.join(arms)}; tokens/s memory/none {r['ratio_memory_to_none']:.3f} "
      f"(MFU vs {r['none']['peak_flops'] / 1e12:.0f} TFLOP/s)")
EOF
}

if [ -n "$STEP" ]; then
    PY=$(cat "$WORK/python")
    if [ -x "$WORK/venv/bin/python" ] && (cd "$WORK" && "$WORK/venv/bin/python" -c 'import mnemo.cli') 2>/dev/null; then
        PY=$WORK/venv/bin/python
    fi
    # Not installed: the checkout's mnemo/ maps the top-level folders (mnemo/__init__.py).
    (cd "$WORK" && "$PY" -c 'import mnemo.cli') 2>/dev/null || export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
    cd "$WORK" || exit 1
    "step_$STEP"
    exit $?
fi

# ---------------------------------------------------------------- driver
PY=""
for c in "${PYTHON:-}" "$REPO/.venv/bin/python" python3 python; do
    [ -n "$c" ] && command -v "$c" >/dev/null 2>&1 || continue
    if "$c" -c 'import importlib.util as u, sys
sys.exit(any(u.find_spec(m) is None for m in ("torch", "deepspeed", "streaming", "sentencepiece", "yaml", "safetensors")))' \
        2>/dev/null; then
        PY=$(command -v "$c")
        break
    fi
done
echo "${PY:-python3}" >"$WORK/python"
echo "gpu_e2e: $([ "$CPU" = 1 ] && echo "CPU dry run" || echo "GPU run") in $WORK, python ${PY:-(none with torch + deepspeed)}"

FAILED=()
N_OK=0
run_step() {  # <name> <timeout s> (GPU_E2E_TIMEOUT_S, if set, replaces every step's); within the budget
    local name=$1 limit=${GPU_E2E_TIMEOUT_S:-$2} t0=$SECONDS rc fig left=$((BUDGET - SECONDS))
    if [ "$left" -lt 10 ]; then
        echo "failed $name skipped: the ${BUDGET} s budget is spent"
        FAILED+=("$name")
        return
    fi
    [ "$limit" -le "$left" ] || limit=$left
    timeout -k 10 "$limit" bash "$SELF" --step "$name" >"$WORK/logs/$name.out" 2>"$WORK/logs/$name.log"
    rc=$?
    if [ "$rc" = 0 ]; then
        fig=$(grep -v '^[[:space:]]*$' "$WORK/logs/$name.out" | tail -n 1)
        echo "ok $name $fig ($((SECONDS - t0)) s)"
        N_OK=$((N_OK + 1))
    else
        if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
            fig="timed out after $limit s"
        else
            fig="rc $rc: $(grep -v '^[[:space:]]*$' "$WORK/logs/$name.log" | grep -iv 'warn' | tail -n 1 | cut -c1-300)"
        fi
        echo "failed $name $fig ($((SECONDS - t0)) s; log $WORK/logs/$name.log)"
        FAILED+=("$name")
    fi
}

# Limits on a GPU (twice as long on a CPU, often shared by other jobs); the MFU measurement, the scarcest
# figure, comes first. The whole run stops starting steps after GPU_E2E_BUDGET_S (GPU: 7.5 minutes).
STEP_LIMITS=(install:90 mfu:180 prepare:90 train_zero2_kill:120 resume_zero2:120 train_zero3:240 eval:90
             generate:60 export:60)
SCALE=$([ "$CPU" = 1 ] && echo 2 || echo 1)
BUDGET=${GPU_E2E_BUDGET_S:-$([ "$CPU" = 1 ] && echo 1200 || echo 450)}
SKIP=""
if [ -z "$PY" ]; then
    echo "failed env no python here imports torch, deepspeed, streaming, sentencepiece, yaml and safetensors"
    FAILED+=(env)
    SKIP="nothing to run it with"
elif [ "$CPU" = 0 ] && ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "failed env no CUDA GPU visible to $PY (a CPU dry run: --cpu)"
    FAILED+=(env)
    SKIP="no GPU"
elif [ -z "$ONLY" ] || [ "${ONLY/,env,/}" != "$ONLY" ]; then
    run_step env 60
fi
for s in "${STEP_LIMITS[@]}"; do
    if [ -n "$ONLY" ] && [ "${ONLY/,${s%%:*},/}" = "$ONLY" ]; then
        continue
    elif [ -n "$SKIP" ]; then
        echo "failed ${s%%:*} skipped: $SKIP"
        FAILED+=("${s%%:*}")
    else
        run_step "${s%%:*}" "$((${s##*:} * SCALE))"
    fi
done
echo "summary: $N_OK ok, ${#FAILED[@]} failed${FAILED:+ (${FAILED[*]})}; logs in $WORK/logs"
[ "${#FAILED[@]}" = 0 ]

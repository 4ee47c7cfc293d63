#!/usr/bin/env bash
# The GPU check of the performance issue as one prepared script for the lent GPU machine (device tool).
#
# Here, once (needs PyPI; ~5 min):  bash benchmarks/device/build_site.sh   -> .devsite/site-cp312.tar.xz (38 MB)
# Then one device call:
#     run(command="bash benchmarks/device/gpu_check.sh", carry=[".devsite/site-cp312.tar.xz"], timeout_s=540)
# A rerun of chosen stages on a warm machine:  STAGES="bench2d compile" BUDGET_S=240 bash benchmarks/device/gpu_check.sh
# Dry run here on the CPU, in a venv with torch but without nnunetv2 (what the device image is like):
#     PYVER=3.11 bash benchmarks/device/build_site.sh
#     DEVICE=cpu OUT=/tmp/gpu_check bash benchmarks/device/gpu_check.sh
#
# Stages (STAGES, default "env tests bench3d bench2d"; "compile" on request), each under its own time limit, none
# started once BUDGET_S seconds (default 450) are spent, so that the call ends inside its timeout and leaves device
# time for a rerun:
#   env      python, torch, GPU, the packages imported from the carried site      -> $OUT/summary.txt
#   tests    pytest tests/test_cuda.py (AMP, finiteness, syncs per step vs nnU-Net) -> $OUT/tests.log
#   bench3d  benchmarks/benchmark_trainers.py -c 3d_fullres -device cuda (all trainers, nnU-Net's AMP, eager)
#                                                                 -> $OUT/bench_3d.log, $OUT/bench_3d.json
#   bench2d  the same for 2d                                      -> $OUT/bench_2d.log, $OUT/bench_2d.json
#   compile  nnUNetTrainer and MemCifSSLTrainer 3d_fullres with nnU-Net's torch.compile -> $OUT/compile.log
# The phantom is 64x160x160 voxels (BENCH_SHAPE) at 1 mm, so that nnU-Net plans GPU-sized patches; the workers'
# logs of failed trainers are appended to $OUT/worker_logs.txt. At most 8 files come back from $OUT: these are 8.
set -uo pipefail
cd "$(dirname "$0")/../.."
START=$SECONDS
DEVICE=${DEVICE:-cuda}
STAGES=${STAGES:-env tests bench3d bench2d}
BUDGET_S=${BUDGET_S:-450}
BENCH_SHAPE=${BENCH_SHAPE:-64 160 160}
OUT=${OUT:-$PWD/gpu_check_out}
PY=${PYTHON:-python3}
WORK=${WORK:-$(mktemp -d)}
mkdir -p "$OUT"
SUMMARY=$OUT/summary.txt
: > "$SUMMARY"
log() { echo "$*" | tee -a "$SUMMARY"; }

# ---------------------------------------------------------------- packages: the carried site, unless installed
if ! "$PY" -c "import nnunetv2" 2>/dev/null; then
    tag=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
    archive=.devsite/site-$tag.tar.xz
    if [ ! -f "$archive" ]; then
        log "error: nnunetv2 is not installed and $archive is missing: run 'PYVER=${tag:2:1}.${tag:3} bash" \
            "benchmarks/device/build_site.sh' here and carry $archive"
        exit 2
    fi
    site=$WORK/site
    mkdir -p "$site"
    "$PY" - "$archive" "$site" <<'EOF' || { log "error: could not unpack $archive"; exit 2; }
import sys, tarfile
with tarfile.open(sys.argv[1]) as archive:
    kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    archive.extractall(sys.argv[2], **kwargs)
EOF
    export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
    log "packages: unpacked $archive into $site"
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # nnunet_mmssl from this working tree
export nnUNet_extTrainer=$PWD/nnunet_mmssl/nnunet_ext  # what the installed .pth hook would set
export PYTHONUNBUFFERED=1 MPLBACKEND=agg nnUNet_compile=false
export nnUNet_def_n_proc=${nnUNet_def_n_proc:-$(( $(nproc) < 8 ? $(nproc) : 8 ))}

stage() {  # stage NAME LIMIT_S LOGFILE COMMAND...: run under a time limit cut to what is left of BUDGET_S
    local name=$1 limit=$2 logfile=$3
    shift 3
    case " $STAGES " in *" $name "*) ;; *) return 0 ;; esac
    local left=$(( BUDGET_S - (SECONDS - START) ))
    if [ "$left" -lt 30 ]; then
        log "[$name] skipped: ${left} s of BUDGET_S=$BUDGET_S left"
        return 0
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    local t0=$SECONDS
    echo "[$name] started, limit ${limit} s"
    # bash -c: timeout runs programs, and the stages are this script's functions (exported below)
    timeout --signal=INT --kill-after=20 "$limit" bash -c '"$@"' stage "$@" > "$logfile" 2>&1
    local rc=$?
    log "[$name] exit $rc after $(( SECONDS - t0 )) s (log $(basename "$logfile"))"
    tail -n "${TAIL_LINES:-25}" "$logfile"
}

env_report() {
    "$PY" - <<'EOF'
import importlib, platform, sys
import torch
print("python", platform.python_version(), sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
for name in ("nnunetv2", "nnunet_mmssl", "batchgenerators", "batchgeneratorsv2", "dynamic_network_architectures",
             "acvl_utils", "blosc2", "SimpleITK", "cc3d", "nibabel", "numpy", "timm"):
    module = importlib.import_module(name)
    print(f"{name} {getattr(module, '__version__', '?')} {getattr(module, '__file__', '')}")
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
print("trainer lookup:", recursive_find_trainer_class_by_name("MemCifSSLTrainer"))
EOF
}

bench() {  # bench CONFIGURATION JSON [extra args]: one benchmark run, its results also in the file JSON
    local configuration=$1 json=$2
    shift 2
    "$PY" benchmarks/benchmark_trainers.py -device "$DEVICE" -c "$configuration" --phantom-shape $BENCH_SHAPE \
        --phantom-spacing 1 1 1 --workdir "$WORK/bench_$configuration" --iterations "${BENCH_ITERATIONS:-10}" \
        --warmup "${BENCH_WARMUP:-3}" --predict-cases 1 --interleaved-rounds "${BENCH_ILV_ROUNDS:-3}" \
        --interleaved-steps 2 -np "$nnUNet_def_n_proc" --json "$json" ${BENCH_TRAINERS:+-tr $BENCH_TRAINERS} "$@"
}

export PY DEVICE BENCH_SHAPE WORK OUT
export -f env_report bench
log "gpu_check: device $DEVICE, stages '$STAGES', budget $BUDGET_S s, phantom $BENCH_SHAPE, work $WORK"
TAIL_LINES=40 stage env 120 "$OUT/env.txt" env_report
[ -f "$OUT/env.txt" ] && { cat "$OUT/env.txt" >> "$SUMMARY"; rm -f "$OUT/env.txt"; }
stage tests 240 "$OUT/tests.log" "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py
stage bench3d 330 "$OUT/bench_3d.log" bench 3d_fullres "$OUT/bench_3d.json"
stage bench2d 240 "$OUT/bench_2d.log" bench 2d "$OUT/bench_2d.json"
# its JSON stays on the machine: 8 files come back at most, and its table is in compile.log
stage compile 300 "$OUT/compile.log" bench 3d_fullres "$WORK/compile.json" -tr nnUNetTrainer MemCifSSLTrainer --compile \
    --interleaved-rounds 0
if compgen -G "$WORK/bench_*/logs/*__*.log" > /dev/null; then
    for f in "$WORK"/bench_*/logs/*__*.log; do
        grep -q "BENCHMARK_RESULT" "$f" && continue
        { echo "=== $f"; tail -n 40 "$f"; } >> "$OUT/worker_logs.txt"
    done
fi
log "gpu_check: done in $(( SECONDS - START )) s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"

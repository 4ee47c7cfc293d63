#!/usr/bin/env bash
# The GPU check as one command for the lent GPU machine (device tool): benchmarks/device/gpu_check.py behind the
# packages that machine lacks.
#
# Here, once (needs PyPI; ~5 min):  bash benchmarks/device/build_site.sh   -> .devsite/site-cp312.tar.xz (38 MB)
# Then one device call (the script itself stops starting trainers after BUDGET_S = 420 s):
#     run(command="bash benchmarks/device/gpu_check.sh", carry=[".devsite/site-cp312.tar.xz"], timeout_s=560)
# Arguments go to gpu_check.py, e.g. a rerun of two trainers on a warm machine:
#     bash benchmarks/device/gpu_check.sh -tr SMMLTrainer DBDCTrainer --budget-s 200
# Dry run here on the CPU at a tiny size (what tests/test_device_script.py does in-process):
#     DEVICE=cpu bash benchmarks/device/gpu_check.sh --phantom-shape 16 48 48 --steps 1 --warmup 1
#
# Files back from $OUT (at most 8 come back; these are 4): gpu_check.json (every number, written after each trainer),
# gpu_check.txt (the table), gpu_check.log (the whole output), env.txt (python, torch, GPU, packages).
set -uo pipefail
cd "$(dirname "$0")/../.."
DEVICE=${DEVICE:-cuda}
BUDGET_S=${BUDGET_S:-420}
OUT=${OUT:-$PWD/gpu_check_out}
PY=${PYTHON:-python3}
WORK=${WORK:-$(mktemp -d)}
mkdir -p "$OUT"

# ---------------------------------------------------------------- packages: the carried site, unless installed
if ! "$PY" -c "import nnunetv2" 2>/dev/null; then
    tag=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
    archive=.devsite/site-$tag.tar.xz
    if [ ! -f "$archive" ]; then
        echo "gpu_check.sh: error: nnunetv2 is not installed and $archive is missing. Run 'PYVER=${tag:2:1}.${tag:3}" \
             "bash benchmarks/device/build_site.sh' here and carry $archive." | tee "$OUT/gpu_check.log" >&2
        exit 2
    fi
    site=$WORK/site
    mkdir -p "$site"
    "$PY" - "$archive" "$site" <<'PYEOF' || { echo "gpu_check.sh: error: $archive, could not unpack it." >&2; exit 2; }
import sys, tarfile
with tarfile.open(sys.argv[1]) as archive:
    kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    archive.extractall(sys.argv[2], **kwargs)
PYEOF
    export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
    echo "packages: unpacked $archive into $site"
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # nnunet_mmssl from this working tree
export nnUNet_extTrainer=$PWD/nnunet_mmssl/nnunet_ext  # what the installed .pth hook would set
export PYTHONUNBUFFERED=1 MPLBACKEND=agg
export nnUNet_def_n_proc=${nnUNet_def_n_proc:-$(( $(nproc) < 8 ? $(nproc) : 8 ))}

"$PY" - > "$OUT/env.txt" 2>&1 <<'PYEOF'
import importlib, platform, sys
import torch
print("python", platform.python_version(), sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
for name in ("nnunetv2", "nnunet_mmssl", "batchgenerators", "batchgeneratorsv2", "dynamic_network_architectures",
             "acvl_utils", "blosc2", "SimpleITK", "cc3d", "nibabel", "numpy"):
    module = importlib.import_module(name)
    print(f"{name} {getattr(module, '__version__', '?')} {getattr(module, '__file__', '')}")
PYEOF
cat "$OUT/env.txt"
# the whole check under a hard limit a little above its own budget (a trainer started just before it may finish)
timeout --signal=INT --kill-after=20 $(( BUDGET_S + 120 )) "$PY" benchmarks/device/gpu_check.py --device "$DEVICE" \
    --out "$OUT" --workdir "$WORK/gpu_check" --budget-s "$BUDGET_S" "$@" 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"

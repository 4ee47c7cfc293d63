#!/usr/bin/env bash
# Build the Python packages the lent GPU machine lacks into one archive that the device tool can carry:
#     bash benchmarks/device/build_site.sh            -> .devsite/site-cp312.tar.xz  (for the device, Python 3.12)
#     PYVER=3.11 bash benchmarks/device/build_site.sh -> .devsite/site-cp311.tar.xz  (a local dry run of the kit)
# Runs here (needs PyPI). The wheels of requirements-device.txt are downloaded for CPython $PYVER on x86-64
# manylinux, the source-only ones are built into wheels, all are unpacked into one folder (a wheel is a zip of
# its installed files), and that folder is packed with xz: 38 MB instead of the wheels' 69 MB, under the 64 MiB a
# device call carries. .devsite/ is in .gitignore. gpu_check.sh unpacks it on the device.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
PYVER=${PYVER:-3.12}
TAG=cp${PYVER/./}
OUT_DIR=.devsite
ARCHIVE=$OUT_DIR/site-$TAG.tar.xz
HERE=benchmarks/device

work=$(mktemp -d)
trap 'rm -rf "$work" "$ARCHIVE.partial"' EXIT
platforms=()
for p in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_24_x86_64 manylinux_2_27_x86_64 \
         manylinux_2_28_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64; do
    platforms+=(--platform "$p")
done
echo "downloading wheels for $TAG ..."
"$PYTHON" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version "$PYVER" \
    --implementation cp "${platforms[@]}" -d "$work/wheels" -r "$HERE/requirements-device.txt"
echo "building the source-only packages ..."
"$PYTHON" -m pip download -q --disable-pip-version-check --no-deps --no-binary=:all: -d "$work/sdist" \
    -r "$HERE/requirements-device-sdist.txt"
for sdist in "$work"/sdist/*; do
    "$PYTHON" -m pip wheel -q --disable-pip-version-check --no-deps -w "$work/wheels" "$sdist"
done
for wheel in "$work"/wheels/*.whl; do
    case "$(basename "$wheel")" in
        *-py3-none-any.whl | *-"$TAG"-*.whl | *-abi3-*.whl) ;;
        *) echo "error: $(basename "$wheel") is not a wheel for $TAG; fix requirements-device*.txt" >&2; exit 1 ;;
    esac
done
echo "unpacking $(ls "$work"/wheels | wc -l) wheels ..."
"$PYTHON" - "$work/wheels" "$work/site" <<'EOF'
import pathlib, sys, zipfile
wheels, site = map(pathlib.Path, sys.argv[1:])
for wheel in sorted(wheels.glob("*.whl")):
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            z.extract(info, site)
            mode = info.external_attr >> 16
            if mode:
                (site / info.filename).chmod(mode & 0o777)
EOF
mkdir -p "$OUT_DIR"
echo "packing (xz, a few minutes on 2 cores) ..."
tar -C "$work/site" -cf - . | xz -T0 -9 > "$ARCHIVE.partial"
mv "$ARCHIVE.partial" "$ARCHIVE"
(cd "$work/wheels" && ls) > "$OUT_DIR/site-$TAG.txt"
echo "wrote $ARCHIVE ($(du -h "$ARCHIVE" | cut -f1)); wheels listed in $OUT_DIR/site-$TAG.txt"

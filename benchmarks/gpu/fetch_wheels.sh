#!/bin/sh
# Downloads the wheels of wheels.txt into .whl/ (git-ignored), for a GPU machine without network.
# Run it where pip reaches PyPI, from the repository root: sh benchmarks/gpu/fetch_wheels.sh
set -e
grep -v '^#' "$(dirname "$0")/wheels.txt" | while read -r wheel; do
    [ -n "$wheel" ] || continue
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "$wheel"
done
ls .whl

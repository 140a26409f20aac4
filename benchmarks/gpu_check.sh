#!/bin/bash
# The GPU checks of a session that is lent one GPU, as one short script (device time is scarce).
#
#   OUT=/tmp/gpu bash benchmarks/gpu_check.sh [quick|compare]
#
# BATCH (512), STEPS (10), KERNEL_ITERS (50) and TRAIN_STEPS (200) size steps 2 and 4; a CPU
# dry run of the script itself (the GPU-only kernel rows then record their errors):
#   PYTHON=python BATCH=2 STEPS=1 KERNEL_ITERS=2 TRAIN_STEPS=10 bash benchmarks/gpu_check.sh
#
# 1. the machine and the versions in use;
# 2. CLIP ViT-B/16 at 224 in bf16 (configs/clip.py:b16), one GPU: benchmarks/train_step.py at
#    batch 512 with remat off and cuDNN attention via 'auto', 3 traced steps for the top ops,
#    the trace and the optimised HLO kept; with KERNELS=1, attention and LayerNorm timed alone
#    by implementation (benchmarks/gpu_kernels.py); the step as `:b16` ships (remat 'auto',
#    which should pick 'none' at 512: its JSON's remat_report says); on a GPU of over
#    120 GB (the H200) also twice the batch with remat off.
#    (Earlier rows for other remat policies and cuBLASLt's epilogues are in
#    benchmarks/README.md.)
# 3. correctness on the GPU: the model, objective and optimizer tests (numpy references, loss
#    and gradients; cuDNN attention against XLA's in bf16);
# 4. the quick start's config (configs/dreamlip.py) trained for 200 steps on the GPU, with its
#    loader processes, an evaluation, checkpoints and metrics, as a user runs it.
# Everything lands in $OUT, in 5 files, 6 on an H200, one more with KERNELS=1 (the device
# tool returns at most 8): bench.log (with the quick start's last metric rows), two or three
# step JSONs, the HLO and trace of the first, the kernels' JSON; COMPARE (below) adds one JSON
# per checkout compared. About 8 minutes on an H100 (521 s in session 22 with the kernels'
# ~60 s: the GPU tests 171 s), plus a minute for each checkout compared, which with a session's
# 15 minutes of device time (the machine's start included) leaves room for one rerun of
# 'quick' at most. 'quick' stops after the first benchmark; 'compare' runs an A/B alone
# (below). Each B/16 benchmark takes about a minute (31-53 s of it compiling; 137 s with
# XLA's Triton GEMMs, which pretrain.main.GPU_XLA_FLAGS turns off).
#
# On a machine without the project's pins installed (this workplace's GPU image has its own
# jax), missing packages come as wheels in .whl/ (see the device tool's README): where the
# python lacks them, they are installed under /tmp/site and put first on PYTHONPATH. The set
# that session 22 carried to the image (Python 3.12 with its own jax 0.11.2, flax 0.12.10,
# optax 0.2.8 and orbax 0.12.4, which the code runs with), from the repo's root, with .whl/
# in .git/info/exclude (5.4 MB; `run` with carry [".whl"]):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 --platform any -d .whl grain==0.2.18 \
#     ml-collections==1.1.0 tensorboardX==2.6.5 simplejpeg==1.9.0 array-record==0.8.6 \
#     cmeel-mimalloc==3.4.3 portpicker==1.6.0
# (Session 11 also carried the pinned flax, optax and orbax; the lines below drop them again
# where they do not import with the image's jax.)
set -u
OUT=$(realpath -m "${OUT:-/tmp/gpu_check}")
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

if ! $PY -c 'import grain, ml_collections' 2>/dev/null && compgen -G '.whl/*.whl' >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
    if ! $PY -c 'import pretrain.train, input_pipeline.pipeline' 2>>"$OUT/bench.log"; then
        echo "the pinned flax/optax/orbax do not import with this jax; using the image's" \
            | tee -a "$OUT/bench.log"
        rm -rf /tmp/site/flax* /tmp/site/optax* /tmp/site/orbax*
    fi
fi

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    $PY -c 'import jax, jaxlib, flax, optax, orbax.checkpoint as o, grain; print("jax", jax.__version__, "jaxlib", jaxlib.__version__, "flax", flax.__version__, "optax", optax.__version__, "orbax", o.__version__); print(jax.devices())'
    # pretrain/allocator.py: with a jax GPU plugin, PRETRAIN_MALLOC=auto keeps the glibc
    # tunables; PRETRAIN_MALLOC=mimalloc bash gpu_check.sh would measure mimalloc here.
    $PY -c 'from pretrain import allocator as a; print("mimalloc:", a.mimalloc_library(), "accelerator plugin:", a.accelerator_plugin_installed())'
} 2>&1 | tee -a "$OUT/bench.log"

# 2. ViT-B/16 CLIP at 224, bf16, batch 512 on one GPU.
bench() {
    local name=$1
    shift
    timeout 150 $PY -m benchmarks.train_step --config configs/clip.py:b16 \
        --config.batch_size=${BATCH:-512} --steps ${STEPS:-10} --warmup 3 --out "$OUT/$name.json" "$@" \
        2>&1 | grep -v '^W0000\|^I0000' | tail -8 | tee -a "$OUT/bench.log"
}
# COMPARE="DIR ..." (other checkouts of this repo inside it, carried with the call: e.g.
# `git archive REF --prefix=.cmp1/ | tar -x` here, then carry .cmp1): the same benchmark
# with remat off from each, on the same machine, for an A/B (each adds about a minute, and a
# JSON).
bench_compared() {
    for dir in ${COMPARE:-}; do
        name=compare_$(basename "$dir" | tr -cd 'A-Za-z0-9_-')
        (cd "$dir" && bench "$name" --config.model.remat=none --label "remat none, from $dir")
    done
}
# 'compare': an A/B alone, no trace, tests or training. The step with remat off from this
# checkout and from each COMPARE checkout, then as shipped from this one and the last
# COMPARE one (at most 5 compared: 8 files come back).
if [ "${1:-}" = compare ]; then
    bench clip_b16_base --config.model.remat=none --label 'remat none, this checkout'
    bench_compared
    bench clip_b16_base_shipped --label 'as shipped, this checkout'
    last=$(echo ${COMPARE:-} | awk '{print $NF}')
    [ -n "$last" ] && (cd "$last" && bench compare_shipped --label "as shipped, from $last")
    exit 0
fi
# The fastest configuration, traced, with its optimised HLO (the fusions that the trace's
# kernel names refer to) and the trace itself.
rm -rf /tmp/gpu_trace
bench clip_b16_cudnn --config.model.remat=none --profile_steps 3 --profile_dir /tmp/gpu_trace \
    --hlo_out "$OUT/clip_b16_cudnn_hlo.txt.gz" --label 'remat none, attention auto (cuDNN)'
cp "$(find /tmp/gpu_trace -name perfetto_trace.json.gz | head -1)" "$OUT/clip_b16_cudnn_trace.json.gz"
[ "${1:-}" = quick ] && exit 0
bench_compared
# Attention and LayerNorm alone on the step's shapes, by implementation (cuDNN with and
# without the padding mask and at other lengths, XLA's, Pallas' Triton and Mosaic GPU
# kernels): where the ~25 ms of attention and ~17 ms of LayerNorm per step could go. (The
# whole step with XLA's attention was 37% slower than with cuDNN's on the H200, session 18.)
# Session 22 ran these (benchmarks/README.md): KERNELS=1 runs them again (about a minute).
if [ "${KERNELS:-0}" = 1 ]; then
    timeout 200 $PY -m benchmarks.gpu_kernels --batch ${BATCH:-512} --iters ${KERNEL_ITERS:-50} \
        --out "$OUT/kernels.json" 2>&1 | grep -v '^W0000\|^I0000' | tail -14 | tee -a "$OUT/bench.log"
fi
bench clip_b16_shipped --label 'as shipped: remat auto, attention auto'
grep -h -o '"remat_report": "[^"]*"' "$OUT/clip_b16_shipped.json" | tee -a "$OUT/bench.log"
# Where the GPU holds twice the activations (the H200's 141 GB), batch 1024 with remat off:
# the same per-sample work, with the optimizer's update and launch gaps spread over twice
# the samples.
mem_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1)
if [ "${mem_mib:-0}" -gt 120000 ]; then
    BATCH=$((2 * ${BATCH:-512})) bench clip_b16_batch2x --config.model.remat=none \
        --label 'remat none, attention auto (cuDNN), twice the batch'
fi

# 3. Correctness: several pytest workers share the GPU, so no worker preallocates it.
XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 240 $PY -m pytest -q -p no:cacheprovider -n 4 --tb=line \
    tests/test_models.py tests/test_objectives.py tests/test_optim.py 2>&1 | tail -40 \
    | tee -a "$OUT/bench.log"

# 4. The quick start's config on the GPU (f32, as the CPU recipe), TRAIN_STEPS steps, with
# its multi-process loader and an evaluation at the end.
rm -rf /tmp/gpu_dreamlip
steps=${TRAIN_STEPS:-200}
/usr/bin/time -f 'wall %e s' timeout 120 $PY -m pretrain.main --config configs/dreamlip.py \
    --workdir /tmp/gpu_dreamlip --config.total_steps=$steps --config.eval_every=$steps \
    --config.progress=false 2>&1 | grep -v '^W0000\|^I0000' | tail -30 | tee -a "$OUT/bench.log"
# Its last logged rows (loss terms, perf/step_time_s, perf/data_wait_frac) into the log.
tail -n 2 /tmp/gpu_dreamlip/metrics.jsonl >>"$OUT/bench.log" 2>/dev/null
exit 0

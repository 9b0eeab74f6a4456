#!/usr/bin/env bash
# The GPU check, for an NVIDIA machine with no network (prepare dist/ here with bench/gpu_prepare.sh):
# builds llama.cpp for CUDA as `make chat GPU=cuda` does (this GPU's architecture, every flash-attention
# K/V kernel, RPC) with llama-bench and llama-server from the same sources, makes a ~1B Llama checkpoint
# with transformers (random weights: speed and memory only), converts and quantizes it to Q4_K_M with
# edgellm, then prints beside llama.cpp's own tools: doctor; the plan against every buffer llama.cpp
# logs at full, partial and auto offload and under --gpu-memory; decode with every K/V type; pp512 and
# tg128; `edgellm run` decode; serve at 1/8/32 streams; VRAM after load. About 9 minutes on 16 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
V=0.3.36
W=${GPU_CHECK_DIR:-/tmp/edgellm-gpu-check}
T0=$SECONDS
step() { echo; echo "=== [$((SECONDS - T0))s] $*"; }
mkdir -p "$W"
nvidia-smi -L
ARCH=${CUDA_ARCH:-$(python3 -m edgellm.system.hardware cuda-arch)}
[ -n "$ARCH" ] || { echo "no NVIDIA GPU visible" >&2; exit 2; }

step "build llama.cpp for CUDA sm_$ARCH (background)"
[ -d "$W/llama_cpp_python-$V" ] || tar xzf "dist/llama_cpp_python-$V.tar.gz" -C "$W"
SRC="$W/llama_cpp_python-$V"
NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
cmake -S "$SRC/vendor/llama.cpp" -B "$W/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
  -DGGML_CUDA=ON -DGGML_CUDA_FA_ALL_QUANTS=ON -DCMAKE_CUDA_ARCHITECTURES="$ARCH" -DGGML_RPC=ON \
  -DCMAKE_C_FLAGS="$NO_AMX" -DCMAKE_CXX_FLAGS="$NO_AMX" -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON > "$W/cmake.log" 2>&1
cmake --build "$W/build" -j"$(nproc)" --target llama llama-bench llama-server mtmd > "$W/build.log" 2>&1 &
BUILD=$!

step "python environment: the machine's torch/transformers, the carried wheels, the sdist's llama_cpp"
python3 -m venv --system-site-packages "$W/venv"
PY="$W/venv/bin/python"
"$PY" -m pip install -q --no-index --find-links dist/wheels fastapi uvicorn gguf minijinja platformdirs rich \
  sentencepiece diskcache jinja2
SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
rm -rf "$SITE/llama_cpp" && cp -r "$SRC/llama_cpp" "$SITE/llama_cpp"
mkdir -p "$SITE/llama_cpp_python-$V.dist-info"
printf 'Metadata-Version: 2.1\nName: llama_cpp_python\nVersion: %s\n' "$V" > "$SITE/llama_cpp_python-$V.dist-info/METADATA"
export PYTHONPATH="$REPO" EDGELLM_HOME="$W/home"

step "a ~1B Llama checkpoint (hidden 2048, 16 layers, 32/8 heads, SmolLM2's tokenizer), random weights"
[ -f "$W/ckpt/config.json" ] || "$PY" - "$W/ckpt" <<'PYEOF'
import shutil, sys, torch
from pathlib import Path
from transformers import LlamaConfig, LlamaForCausalLM
out = Path(sys.argv[1])
torch.manual_seed(0)
config = LlamaConfig(vocab_size=49152, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                     rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
with torch.device("cpu"):
    model = LlamaForCausalLM(config).to(torch.bfloat16)
model.save_pretrained(out)
for f in Path("dist/tokenizer").iterdir():
    shutil.copy(f, out / f.name)
print(sum(p.numel() for p in model.parameters()) / 1e9, "B parameters")
PYEOF

step "wait for the build"
wait $BUILD || { tail -30 "$W/build.log"; exit 1; }
mkdir -p "$SITE/llama_cpp/lib"
cp -L "$W"/build/bin/lib*.so* "$SITE/llama_cpp/lib/"
BIN="$W/build/bin"
EDGELLM=("$PY" -m edgellm)

step "convert and quantize with edgellm"
"${EDGELLM[@]}" list | grep -q gpu1b-q4_k_m || {
  "${EDGELLM[@]}" convert "$W/ckpt" --outtype f16 --name gpu1b-f16
  "${EDGELLM[@]}" quantize gpu1b-f16 Q4_K_M
}
MODEL=$(ls "$EDGELLM_HOME"/models/gpu1b-q4_k_m/*.gguf)

step "doctor"
"${EDGELLM[@]}" doctor

step "plan against llama.cpp's buffers; every K/V type beside llama-bench"
"$PY" bench/gpu_plan_check.py "$MODEL" --llama-bench "$BIN/llama-bench"

step "pp512 / tg128 against llama-bench (all layers, flash attention)"
"$PY" bench/compare_llama_bench.py "$MODEL" -r 3 --llama-bench "$BIN/llama-bench" --extra "-ngl 99 -fa 1"

step "edgellm run: decode tokens/s"
for i in 1 2; do
  "${EDGELLM[@]}" run gpu1b-q4_k_m "Write a long story about a lighthouse." -n 256 --temperature 0 --json \
    --gpu-layers all | "$PY" -c 'import json,sys; t=json.load(sys.stdin)["timings"]; print({k: t[k] for k in t if "per_second" in k or "tokens" in k})'
done

step "serve at 1/8/32 streams against llama-server; VRAM after load"
"$PY" bench/serve_throughput.py "$MODEL" -n 128 --streams 1,8,32 --gpu-layers 99 --llama-server "$BIN/llama-server" --vram

step "done"

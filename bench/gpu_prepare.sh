#!/usr/bin/env bash
# Run here, before lending time on a GPU machine: puts into dist/ what bench/gpu_check.sh needs there
# (that machine has no network; its python3 is 3.12 with torch, transformers and numpy):
#   dist/llama_cpp_python-0.3.36.tar.gz   the sdist, trimmed (no models, docs, .git: 76 -> ~12 MB)
#   dist/wheels/                          the cp312 wheels that machine lacks, at this venv's versions
#   dist/tokenizer.tar.xz                 SmolLM2's HF tokenizer, for the checkpoints made there
# then: run with carry ["dist"] and the command `bash bench/gpu_check.sh`; or, with llama.cpp built
# here by bench/gpu_prebuild.sh, carry dist/wheels, dist/tokenizer.tar.xz and dist/llama-cuda-sm90.tar.xz
# (the sdist is then not needed there, and all of it stays under the 64 MiB a call carries).
set -euo pipefail
cd "$(dirname "$0")/.."
V=0.3.36
mkdir -p dist/tokenizer
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
python3 -m pip download -q --no-binary :all: --no-deps "llama-cpp-python==$V" -d "$work"
tar xzf "$work/llama_cpp_python-$V.tar.gz" -C "$work"
src="$work/llama_cpp_python-$V"
rm -rf "$src/vendor/llama.cpp/models" "$src/vendor/llama.cpp/docs" "$src/vendor/llama.cpp/media" \
       "$src/vendor/llama.cpp/.git"* "$src/vendor/llama.cpp/examples/"*/*.gguf
find "$src" -name .git -prune -exec rm -rf {} +
tar czf "dist/llama_cpp_python-$V.tar.gz" -C "$work" "llama_cpp_python-$V"
# what that machine's image lacks (its list is in the device tool's KINDS.md), at the versions tested here
wanted=$(.venv/bin/python -m pip freeze | grep -iE '^(fastapi|starlette|pydantic|pydantic-core|pydantic_core|annotated-types|annotated_types|typing-inspection|typing_inspection|typing-extensions|typing_extensions|uvicorn|gguf|minijinja|platformdirs|diskcache|opentelemetry-api|opentelemetry_api|importlib-metadata|importlib_metadata)==')
rm -rf dist/wheels && mkdir -p dist/wheels
python3 -m pip download -q --only-binary :all: --no-deps --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d dist/wheels $wanted
fixture=$(ls -d "$HOME"/.cache/edgellm/fixtures/smollm2-135m-instruct-*/ 2>/dev/null | head -1)
[ -n "$fixture" ] || .venv/bin/python -c "
from edgellm.models.bundled import bundled_gguf
from tests.hf_fixtures import hf_checkpoint
hf_checkpoint(bundled_gguf(), 'smollm2-135m-instruct')"
fixture=$(ls -d "$HOME"/.cache/edgellm/fixtures/smollm2-135m-instruct-*/ | head -1)
cp "$fixture"/tokenizer* "$fixture"/*.jinja dist/tokenizer/ 2>/dev/null || cp "$fixture"/tokenizer* dist/tokenizer/
XZ_OPT=-9 tar cJf dist/tokenizer.tar.xz -C dist tokenizer
du -sh dist

#!/usr/bin/env bash
# Install llama-cpp-python (a CPU build from its PyPI source) into the active Python, and put
# llama.cpp's own convert_hf_to_gguf.py (vendored in that source) beside it, for
# tests/test_llamacpp.py. The wheel and the converter are cached, keyed by version, in the
# user's nnsteer cache ($NNSTEER_BUILD_CACHE, else ~/.cache/nnsteer; not $NNSTEER_CACHE,
# which CI makes fresh for every run): the first run compiles llama.cpp (about 27 min on 2
# busy cores), later runs install the cached wheel (seconds).
#
#   bash scripts/llamacpp.sh            # version below; LLAMA_CPP_PYTHON_VERSION overrides
set -euo pipefail

version="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
cache="${NNSTEER_BUILD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/nnsteer}/llama-cpp-python-$version"
python="${PYTHON:-python}"

if ! ls "$cache"/wheel/llama_cpp_python-"$version"-*.whl >/dev/null 2>&1; then
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    started=$(date +%s)
    "$python" -m pip download --quiet --no-deps --no-binary :all: -d "$work/sdist" \
        "llama-cpp-python==$version"
    # CPU only; no tools, examples, tests or downloads: the Python package needs libllama.
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_BLAS=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF \
-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_CURL=OFF" \
    CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
        "$python" -m pip wheel --quiet --no-deps -w "$work/wheel" "$work"/sdist/*.tar.gz
    tar -xzf "$work"/sdist/*.tar.gz -C "$work"
    vendored="$(echo "$work"/llama_cpp_python-*/vendor/llama.cpp)"
    mkdir -p "$work/converter"
    cp -r "$vendored"/convert_hf_to_gguf.py "$vendored"/conversion "$vendored"/gguf-py "$work/converter/"
    mkdir -p "$(dirname "$cache")"
    rm -rf "$cache.tmp" && mkdir "$cache.tmp"
    mv "$work/wheel" "$work/converter" "$cache.tmp/"
    rm -rf "$cache" && mv "$cache.tmp" "$cache"  # complete or absent, never half-written
    echo "llamacpp.sh: built llama-cpp-python $version in $(( $(date +%s) - started )) s, cached in $cache"
fi

"$python" -m pip install --quiet "$cache"/wheel/llama_cpp_python-"$version"-*.whl sentencepiece
echo "llamacpp.sh: llama-cpp-python $version installed; converter: $cache/converter/convert_hf_to_gguf.py"

#!/usr/bin/env bash
# Install the real llama.cpp into the active Python for tests/test_llamacpp.py: llama-cpp-python's
# Python bindings (its PyPI source, installed without its own native build) over libllama and
# libggml compiled from the llama.cpp that source vendors (CPU, the `llama` target only), and
# llama.cpp's own convert_hf_to_gguf.py beside them. The bindings' wheel, the libraries and the
# converter are cached, keyed by version, in the user's nnsteer build cache
# ($NNSTEER_BUILD_CACHE, else ~/.cache/nnsteer; not $NNSTEER_CACHE, which CI makes fresh for
# every run): the first run compiles (measured time in docs/vectors-elsewhere.md), later runs
# install from the cache (seconds).
#
#   bash scripts/llamacpp.sh            # version below; LLAMA_CPP_PYTHON_VERSION overrides
set -euo pipefail

version="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
cache="${NNSTEER_BUILD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/nnsteer}/llama-cpp-python-$version"
python="${PYTHON:-python}"

# lib/ is what this layout adds to the former one (wheel/ and converter/ only): such a cache is rebuilt.
if [ ! -d "$cache/lib" ]; then
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    started=$(date +%s)
    "$python" -m pip download --quiet --no-deps --no-binary :all: -d "$work/sdist" \
        "llama-cpp-python==$version"
    # The bindings alone: LLAMA_BUILD=OFF skips the package's native build (and its `common` library).
    CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" \
        "$python" -m pip wheel --quiet --no-deps -w "$work/wheel" "$work"/sdist/*.tar.gz
    tar -xzf "$work"/sdist/*.tar.gz -C "$work"
    vendored="$(echo "$work"/llama_cpp_python-*/vendor/llama.cpp)"
    # libllama and the ggml libraries it links, found beside each other at run time ($ORIGIN).
    cmake -S "$vendored" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
        -DCMAKE_INSTALL_RPATH='$ORIGIN' -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON \
        -DGGML_NATIVE=OFF -DGGML_BLAS=OFF -DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF \
        -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF >/dev/null
    cmake --build "$work/build" --target llama -j "${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" >/dev/null
    mkdir -p "$work/lib" "$work/converter"
    cp -a "$work"/build/bin/lib*.so* "$work/lib/"
    cp -r "$vendored"/convert_hf_to_gguf.py "$vendored"/conversion "$vendored"/gguf-py "$work/converter/"
    mkdir -p "$(dirname "$cache")"
    rm -rf "$cache.tmp" && mkdir "$cache.tmp"
    mv "$work/wheel" "$work/lib" "$work/converter" "$cache.tmp/"
    rm -rf "$cache" && mv "$cache.tmp" "$cache"  # complete or absent, never half-written
    echo "llamacpp.sh: built llama.cpp (llama-cpp-python $version) in $(( $(date +%s) - started )) s, cached in $cache"
fi

"$python" -m pip install --quiet "$cache"/wheel/llama_cpp_python-"$version"-*.whl sentencepiece
package="$("$python" -c 'import importlib.util, os; print(os.path.dirname(importlib.util.find_spec("llama_cpp").origin))')"
mkdir -p "$package/lib"
cp -a "$cache"/lib/. "$package/lib/"
"$python" -c 'import llama_cpp; llama_cpp.llama_backend_init()'  # the libraries load
echo "llamacpp.sh: llama-cpp-python $version installed; converter: $cache/converter/convert_hf_to_gguf.py"

#!/bin/sh
# Install the cyborg server into a new virtual environment: the project's wheel with its `serving`
# extra (grpcio, onnxruntime-gpu, ...; never torch) and, for the GPU variant, TensorRT.
# The Dockerfile's builder stage runs this script and tests/test_deploy.py runs it too, so the test
# installs exactly what the image installs.
#
# Usage: deploy/install-serving.sh VENV VARIANT [SOURCE]
#   VENV     where to create the virtual environment (must not exist yet)
#   VARIANT  gpu | cpu
#   SOURCE   the project folder to build the wheel from (default: .)
# PYTHON names the interpreter that creates the environment (default: python3).
set -eu

# GPU variant only. onnxruntime-gpu's TensorRT provider links libnvinfer.so.10 and libcudart.so.13,
# and serving/runtime.py runs TensorRT plans with the TensorRT 10 API through cuda-python: so
# TensorRT 10 built for CUDA 13, and cuda-python for CUDA 13.0 (the Dockerfile's CUDA base image).
GPU_REQUIREMENTS="tensorrt-cu13==10.16.1.11 cuda-python==13.0.3"
GPU_INDEX="https://pypi.nvidia.com"

if [ "$#" -lt 2 ]; then
    echo "usage: $0 VENV gpu|cpu [SOURCE]" >&2
    exit 2
fi
venv="$1"
variant="$2"
source_dir="${3:-.}"
case "$variant" in
    gpu | cpu) ;;
    *)
        echo "$0: VARIANT must be gpu or cpu, not '$variant'" >&2
        exit 2
        ;;
esac
if [ -e "$venv" ]; then
    echo "$0: $venv already exists" >&2
    exit 2
fi

"${PYTHON:-python3}" -m venv "$venv"
pip="$venv/bin/pip"
wheels="$(mktemp -d)"
trap 'rm -rf "$wheels"' EXIT

"$pip" wheel --quiet --no-deps --wheel-dir "$wheels" "$source_dir"
set -- "$wheels"/cyborg-*.whl
"$pip" install --quiet "$1[serving]"

if [ "$variant" = gpu ]; then
    # shellcheck disable=SC2086  # the requirements are meant to split into words
    "$pip" install --quiet --extra-index-url "$GPU_INDEX" $GPU_REQUIREMENTS
    # A fixed path for the TensorRT libraries, whatever the Python version (see LD_LIBRARY_PATH in
    # the Dockerfile): onnxruntime's TensorRT provider loads libnvinfer.so.10 from there.
    nvinfer="$(find "$venv/lib" -name 'libnvinfer.so.10*' -print | head -n 1)"
    if [ -z "$nvinfer" ]; then
        echo "$0: the TensorRT wheels installed no libnvinfer.so.10" >&2
        exit 1
    fi
    ln -s "$(dirname "$nvinfer")" "$venv/tensorrt_libs"
fi

# The serving image must never carry torch.
"$venv/bin/python" -c '
import importlib.util, sys
if importlib.util.find_spec("torch") is not None:
    sys.exit("install-serving.sh: torch was installed into the serving environment")
'

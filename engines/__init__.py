"""Engines: run an exported model version (model.onnx with ONNX Runtime, model.plan with TensorRT).

Below both halves, beside the kernel: the server runs its models through `engines.runtime`, and
export checks the TensorRT engine it builds with the very same runner; `engines.cpu` says whether
this CPU's int8 kernels saturate 8-bit weights, for the server and export alike. Imports `core` and, inside
the backends, onnxruntime / tensorrt / cuda-python; never torch, `training` or `serving`.
"""

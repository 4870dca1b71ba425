"""NVIDIA Triton's `config.pbtxt` for an exported model (text format of Triton's ModelConfig)."""

from __future__ import annotations

from core.contract import CAM_OUTPUT, INPUT_NAME, LOGITS_OUTPUT, SCORE_OUTPUT, TRITON_PLATFORM, ModelContract


def triton_config(contract: ModelContract, platform: str = TRITON_PLATFORM) -> str:
    """The config.pbtxt text that makes Triton serve `contract`'s model.onnx with the same tensors.

    Triton adds the batch dimension itself (max_batch_size > 0), so dims leave it out; `score` is
    [B] in the graph, which Triton describes as dims [1] reshaped to [].
    """
    batching = contract.batching
    h, w = contract.cam_shape
    tensors = [
        (SCORE_OUTPUT, [1], "    reshape: { shape: [ ] }\n"),
        (LOGITS_OUTPUT, [len(contract.class_names)], ""),
        (CAM_OUTPUT, [h, w], ""),
    ]
    outputs = ",\n".join(
        "  {\n"
        f'    name: "{name}"\n'
        "    data_type: TYPE_FP32\n"
        f"    dims: [ {', '.join(map(str, dims))} ]\n"
        + extra
        + "  }"
        for name, dims, extra in tensors
    )
    channels, height, width = contract.input_shape
    return (
        f'name: "{contract.name}"\n'
        f'platform: "{platform}"\n'
        f"max_batch_size: {batching.max_batch_size}\n"
        "version_policy: { latest: { num_versions: 1 } }\n"
        "input [\n"
        "  {\n"
        f'    name: "{INPUT_NAME}"\n'
        "    data_type: TYPE_UINT8\n"
        "    format: FORMAT_NCHW\n"
        f"    dims: [ {channels}, {height}, {width} ]\n"
        "  }\n"
        "]\n"
        f"output [\n{outputs}\n]\n"
        "dynamic_batching {\n"
        f"  max_queue_delay_microseconds: {int(round(batching.max_queue_delay_ms * 1000))}\n"
        "  default_queue_policy { max_queue_size: %d }\n" % batching.max_queue_size
        + "}\n"
    )

"""int8 on CPUs without VNNI (`engines.cpu`): 8-bit weights saturate in ONNX Runtime's u8s8 kernels,
7-bit weights do not, and the server runs an 8-bit graph on exact kernels there."""

import logging

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from core import contract as c
from engines import cpu
from engines.runtime import load_backend

CHANNELS = 4
OUT_SCALE = 1024.0  # the output's uint8 step: sums up to 255 x 1024
WHITE = np.full((1, CHANNELS, 4, 4), 255, np.uint8)


def qdq_conv(weight: int) -> bytes:
    """uint8 images [N, 4, 4, 4] -> a 1x1 QDQ convolution whose int8 weights all equal `weight` (scales
    1), given as each of the contract's outputs (so the server's engine loads it)."""
    nodes = [
        helper.make_node("DequantizeLinear", [c.INPUT_NAME, "one", "u0"], ["xf"]),
        helper.make_node("DequantizeLinear", ["w", "one", "s0"], ["wf"]),
        helper.make_node("Conv", ["xf", "wf"], ["y"]),
        helper.make_node("QuantizeLinear", ["y", "ys", "u0"], ["yq"]),
        helper.make_node("DequantizeLinear", ["yq", "ys", "u0"], ["out"]),
        *(helper.make_node("Identity", ["out"], [name]) for name in c.OUTPUT_NAMES),
    ]
    inits = [
        numpy_helper.from_array(np.full((1, CHANNELS, 1, 1), weight, np.int8), "w"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array(np.array(OUT_SCALE, np.float32), "ys"),
        numpy_helper.from_array(np.array(0, np.uint8), "u0"),
        numpy_helper.from_array(np.array(0, np.int8), "s0"),
    ]
    inputs = [helper.make_tensor_value_info(c.INPUT_NAME, TensorProto.UINT8, ["N", CHANNELS, 4, 4])]
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", 1, 4, 4]) for name in c.OUTPUT_NAMES]
    graph = helper.make_graph(nodes, "qdq_conv", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 9
    return model.SerializeToString()


def convolve(weight: int, entries: dict[str, str]) -> float:
    import onnxruntime as ort

    options = ort.SessionOptions()
    for key, value in entries.items():
        options.add_session_config_entry(key, value)
    session = ort.InferenceSession(qdq_conv(weight), options, providers=["CPUExecutionProvider"])
    return float(session.run([c.SCORE_OUTPUT], {c.INPUT_NAME: WHITE})[0].flat[0])


saturating_cpu = pytest.mark.skipif(not cpu.int8_pairs_saturate(), reason=f"this CPU ({cpu.int8_kernels()}) adds int8 pairs without saturating")


@saturating_cpu
def test_eight_bit_weights_saturate_here_and_the_exact_entries_fix_it():
    exact = CHANNELS * 255 * 127  # 129,540; each pair of products is 64,770 > 32,767
    assert convolve(127, {}) < 0.6 * exact  # the 16-bit pair sums clamp: about half the true sum
    assert convolve(127, cpu.exact_int8_entries(8)) == pytest.approx(exact, abs=OUT_SCALE)


def test_seven_bit_weights_are_exact_everywhere():
    exact = CHANNELS * 255 * 63
    assert cpu.exact_int8_entries(7) == {}
    assert convolve(63, {}) == pytest.approx(exact, abs=OUT_SCALE)


def test_cpu_flags_and_which_cpus_saturate(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse4_1 avx avx2\n\nprocessor\t: 1\nflags\t: avx512_vnni\n")
    flags = cpu.cpu_flags(info)
    assert flags == {"fpu", "sse4_1", "avx", "avx2"}  # the first processor's
    assert cpu.cpu_flags(tmp_path / "missing") is None
    assert cpu.int8_pairs_saturate(flags, "x86_64") is True
    assert cpu.int8_pairs_saturate(flags | {"avx512_vnni"}, "x86_64") is False
    assert cpu.int8_pairs_saturate(flags | {"avx_vnni"}, "AMD64") is False
    assert cpu.int8_pairs_saturate(flags, "aarch64") is False  # ARM's dot products add in 32 bits
    assert cpu.int8_pairs_saturate(frozenset(), "x86_64") is True
    assert cpu.int8_kernels(flags, "x86_64").startswith("x86-64 without VNNI")
    assert cpu.int8_kernels(flags | {"avx512_vnni"}, "AMD64") == "x86-64 with VNNI"
    assert cpu.int8_kernels(flags, "aarch64") == "aarch64"


def test_contract_reads_the_weight_bits():
    base = dict(name="m", version=1, architecture="a", input_height=8, input_width=8, cam_height=1, cam_width=1,
                mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), threshold=0.5)  # fmt: skip
    assert c.ModelContract(**base).int8_weight_bits == 0
    assert c.ModelContract(**base, precision="int8").int8_weight_bits == 8  # exported before the field: full range
    assert c.ModelContract(**base, precision="int8", metrics={"int8": {"weight_bits": 7}}).int8_weight_bits == 7


@pytest.fixture
def int8_version(tmp_path):
    """A version folder whose model.onnx is the QDQ convolution, under the contract's input and output names."""
    (tmp_path / c.ONNX_FILE).write_bytes(qdq_conv(127))
    return tmp_path


def contract(bits: int | None) -> c.ModelContract:
    metrics = {"int8": {"weight_bits": bits}} if bits else {}
    return c.ModelContract(name="m", version=3, architecture="a", input_height=4, input_width=4, cam_height=1, cam_width=1,
                           mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), threshold=0.5, precision="int8", metrics=metrics)  # fmt: skip


@pytest.mark.parametrize("saturates, bits, exact", [(True, None, True), (True, 8, True), (True, 7, False), (False, 8, False)])
def test_the_server_asks_for_exact_kernels_only_for_eight_bit_weights_on_saturating_cpus(int8_version, monkeypatch, caplog,
                                                                                          saturates, bits, exact):  # fmt: skip
    monkeypatch.setattr(cpu, "int8_pairs_saturate", lambda *args: saturates)
    with caplog.at_level(logging.WARNING, logger="engines.runtime"):
        backend = load_backend(int8_version, contract(bits), device="cpu")
    assert backend.config_entries == ({cpu.EXACT_INT8_ENTRY: "1"} if exact else {})
    assert ("m v3 is an int8 graph with 8-bit weights" in caplog.text) is exact


@saturating_cpu
def test_the_server_scores_an_eight_bit_graph_as_a_vnni_cpu_would(int8_version):
    exact = CHANNELS * 255 * 127
    served = load_backend(int8_version, contract(None), device="cpu").run(WHITE)[c.SCORE_OUTPUT].flat[0]
    assert served == pytest.approx(exact, abs=OUT_SCALE)
    mislabelled = load_backend(int8_version, contract(7), device="cpu").run(WHITE)[c.SCORE_OUTPUT].flat[0]
    assert mislabelled < 0.6 * exact  # what the default kernels give: the entries are what fixes it

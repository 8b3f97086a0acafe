"""Weight-only int8 / int4 quantization of the decoder's MatMuls with onnxruntime's MatMulNBits.

Weights are quantized per block of 32 input rows, symmetric, round-to-nearest; activations stay
float. accuracy_level 4 lets the CPU kernel compute in int8 with float accumulation (VNNI / AMX
where the CPU has them), which is where the speed on a CPU comes from.
"""

from __future__ import annotations

import logging

import onnx

BLOCK_SIZE = 32


def quantize_weights(proto: onnx.ModelProto, bits: int) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.ERROR)
    config = DefaultWeightOnlyQuantConfig(block_size=BLOCK_SIZE, is_symmetric=True, accuracy_level=4, bits=bits)
    quantizer = MatMulNBitsQuantizer(proto, algo_config=config)
    quantizer.process()
    out = quantizer.model.model
    if not any(n.op_type == "MatMulNBits" for n in out.graph.node):
        raise RuntimeError("the int quantizer found no MatMul weights to quantize in the decoder graph")
    return out

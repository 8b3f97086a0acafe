"""Triton kernels for the CUDA path, each beside a plain-torch reference with the same signature.

    projector.py        fused_projector / fused_projector_ref: GEMM + bias + GELU, GEMM + bias,
                        rows scattered straight into the input-embedding buffer (linear variant too)
    rmsnorm.py          add_rmsnorm / add_rmsnorm_ref: residual add fused with RMSNorm
    swiglu.py           silu_mul / silu_mul_ref: silu(gate) * up from the fused gate/up projection
    rope_kv.py          rope_kv_write / rope_kv_write_ref: RoPE on q and k fused with the paged
                        KV-cache write through a slot mapping; rope_tables builds the cos/sin tables
    paged_attention.py  paged_decode_attention(_ref): decode over the paged cache, MHA/GQA,
                        split-K (flash-decoding) with a combine kernel; paged_prefill_attention(_ref):
                        causal attention of packed/padded new queries over the cache (chunked prefill)

The modules import without Triton (the references always work); the Triton functions need it,
and run on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (tests). See `_triton.py`.
Nothing here imports llava_rt: kernels sit below the core in the dependency order.
"""

from ._triton import HAVE_TRITON, INTERPRET, kernels_usable

__all__ = ["HAVE_TRITON", "INTERPRET", "kernels_usable"]

"""Imported first by the kernel tests: compiled kernels on CUDA, Triton's interpreter elsewhere.

The interpreter flag is read when a kernel is defined, so TRITON_INTERPRET=1 is set here,
before any llava_rt.kernels module is imported.
"""

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def require_triton() -> None:
    """Skip the calling test module where the kernels cannot run."""
    pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[dev]' on Linux)")
    from llava_rt.kernels import INTERPRET

    if not CUDA and not INTERPRET:
        pytest.skip("llava_rt.kernels was imported before TRITON_INTERPRET=1 was set; run this file alone",
                    allow_module_level=True)

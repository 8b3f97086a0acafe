import os
import sys
from pathlib import Path

# `python -m pytest` puts the working directory on sys.path. From the repository root its source
# folders (kernels/, runtime/, export/: installed as llava_rt.*) would then shadow packages of
# the same name: transformers 5.25 imports Hugging Face's `kernels` package wherever it is installed.
ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]

# Tests never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Triton reads the interpreter flag when a kernel is defined, and any test module may import
# llava_rt.kernels (through the model); so the flag is set here, before all test imports.
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

"""llava-rt: train, export and serve LLaVA-style vision-language models."""

__version__ = "0.1.0"

# The runtime loads on first use, so `import llava_rt` stays light (no torch, no onnxruntime).
_LAZY = {"LLM": "llm", "AsyncLLM": "llm", "SamplingParams": "sampling", "SchedulerConfig": "scheduler"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"llava_rt.runtime.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'llava_rt' has no attribute {name!r}")

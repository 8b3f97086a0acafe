"""llava-rt: train, export and serve LLaVA-style vision-language models."""

__version__ = "0.1.0"

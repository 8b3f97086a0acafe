"""llava-train: the synthetic world, base models, both LLaVA stages, evaluation."""

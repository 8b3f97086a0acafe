"""llava-export: checkpoints to verified ONNX export directories with a manifest."""

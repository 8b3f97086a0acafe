"""Engines (torch), sampling and the llava-infer command."""

"""Checkpoint import from other codebases (Hugging Face transformers: `hf_switch`)."""

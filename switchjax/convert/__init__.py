"""Checkpoint import from other codebases (Hugging Face transformers: `hf_switch`) and
sparse upcycling of a dense model's params (`upcycle`)."""

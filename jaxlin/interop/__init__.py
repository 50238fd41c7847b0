"""Interoperability with other formats: Hugging Face Llama-family checkpoints (`huggingface`)."""

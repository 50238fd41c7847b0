"""Interoperability with other formats: Hugging Face Llama-family checkpoints (`huggingface`),
transformers' Mamba2Mixer weights (`mamba2`)."""

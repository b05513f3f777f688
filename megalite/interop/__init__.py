"""Interoperability with other checkpoint formats (Hugging Face Llama)."""

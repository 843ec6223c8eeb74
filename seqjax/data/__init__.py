"""Data utilities: transforms on token sequences (JRT-Prompt, ...)."""

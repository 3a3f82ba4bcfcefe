"""Text sources: builtin (offline), hf (Hugging Face datasets / local stand-ins), files."""

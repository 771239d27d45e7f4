"""Weight loading: safetensors (single or sharded), dummy random weights, GGUF conversion."""

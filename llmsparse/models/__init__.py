"""Models in: load a hub id, folder or GGUF file; find decoder layers, prunable weights and fused experts
generically; count zeros."""

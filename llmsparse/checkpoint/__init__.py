"""Model folders on disk: dense and compact writers, the compact layout and its integrity checks, the
transformers quantizer that loads compact folders, and ``inspect`` (sizes)."""

"""Choosing masks and updating weights: settings, patterns, methods, refiners, layer allocation and ``prune``."""

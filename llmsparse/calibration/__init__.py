"""The layer walk: one decoder layer on the device at a time, hooks that collect input statistics, activation
caches in memory or on disk, resumable commits."""

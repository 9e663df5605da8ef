"""paperjax's shared core: configs, layers, training loop, sharding, checkpoints, metrics, reports.

Knows nothing about any paper; `lir`, `internal_rl` and `spatia` build on it.
"""

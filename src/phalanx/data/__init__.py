"""Data path: source readers -> prepared store -> global sampler -> rank shard -> loader -> device augment."""

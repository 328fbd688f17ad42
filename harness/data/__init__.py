"""Data: synthetic GoPro-style sets (synth), packing (pack), shard manifests (shards), loaders (stream)."""

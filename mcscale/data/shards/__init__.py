"""Sharded data: `mcscale prepare` (WebDataset tars + DALI indexes + manifest) and the streaming loaders.

- mcscale.data.shards.prepare: prepare(), write_arrays(), the `prepare` subcommand (add_parser / run / main)
- mcscale.data.shards.webdataset_loader.WebDatasetLoader, mcscale.data.shards.dali_loader.DaliLoader
- mcscale.data.shards.batch: ShardBatch, the rank split and padding rules, StreamViews (trainer adapter)
- mcscale.data.shards.verify: the loaders' SHA-256 check of every shard against the manifest (with a cache)

The loaders import their optional libraries (webdataset, nvidia.dali) only when used.
"""

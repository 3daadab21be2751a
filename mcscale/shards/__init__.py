"""Sharded data: `mcscale prepare` (WebDataset tars + DALI indexes + manifest) and the streaming loaders.

- mcscale.shards.prepare: prepare(), write_arrays(), the `prepare` subcommand (add_parser / run / main)
- mcscale.shards.webdataset_loader.WebDatasetLoader, mcscale.shards.dali_loader.DaliLoader
- mcscale.shards.batch: ShardBatch, the rank split and padding rules, StreamViews (trainer adapter)

The loaders import their optional libraries (webdataset, nvidia.dali) only when used.
"""

"""mcscale: long-tailed deep clustering (MiniClustering, MaxiClustering, P2OT) at scale."""

__version__ = "0.1.0"

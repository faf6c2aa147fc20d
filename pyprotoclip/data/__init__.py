"""pyprotoclip.data: webdataset loading, shard writing and the built-in synthetic dataset."""

from pyprotoclip.data.synthetic import write_synthetic_dataset

__all__ = ["write_synthetic_dataset"]

"""pyprotoclip.data: webdataset loading, shard writing and the built-in synthetic dataset."""

from pyprotoclip.data.pipeline import DataConfig, Loader, build_loader, expand_shards, read_zeroshot_files
from pyprotoclip.data.synthetic import write_synthetic_dataset

__all__ = ["DataConfig", "Loader", "build_loader", "expand_shards", "read_zeroshot_files", "write_synthetic_dataset"]

"""Data layer: raw sources -> long-tailed subsets -> WebDataset shards, and reading a rank's share back."""
from csdm_dist.data.longtail import index_hash, longtail_counts, select_longtail
from csdm_dist.data.shards import ShardData, ShardError, dataset_dir, load_manifest, read_split, write_split
from csdm_dist.data.sources import DatasetNotFoundError, RawDataError, RawSplit, load_source

__all__ = ["DatasetNotFoundError", "RawDataError", "RawSplit", "ShardData", "ShardError", "dataset_dir",
           "index_hash", "load_manifest", "load_source", "longtail_counts", "read_split", "select_longtail",
           "write_split"]

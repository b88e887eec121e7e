"""Data layer: raw sources -> long-tailed subsets -> WebDataset shards, and reading a rank's share back."""
from csdm_dist.data.longtail import index_hash, longtail_counts, relabel, select_longtail, select_val
from csdm_dist.data.manifest import (ManifestError, build_command, check_counts, config_hash, eval_split, ids_hash,
                                     split_names)
from csdm_dist.data.shards import (ShardData, ShardError, dataset_dir, load_manifest, read_split, verify_dataset,
                                   write_split)
from csdm_dist.data.sources import DatasetNotFoundError, RawDataError, RawSplit, load_source

__all__ = ["DatasetNotFoundError", "ManifestError", "RawDataError", "RawSplit", "ShardData", "ShardError",
           "build_command", "check_counts", "config_hash", "dataset_dir", "eval_split", "ids_hash", "index_hash",
           "load_manifest", "load_source", "longtail_counts", "read_split", "relabel", "select_longtail",
           "select_val", "split_names", "verify_dataset", "write_split"]

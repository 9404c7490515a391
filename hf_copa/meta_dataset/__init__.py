"""Meta-Dataset without TensorFlow: records and specs, conversion to Hub datasets, pixels, official episodes.

- `records`: the TFRecord framing (both CRC-32C checks) and `tf.train.Example` parsing;
- `specs`: `dataset_spec.json` in its three forms, with Meta-Dataset's class ranges per split;
- `convert`: a source's records -> a Hub-layout dataset folder (parquet, image bytes unchanged), resumable,
  optionally pushed (`hf-copa meta-dataset convert`);
- `decoder`: TensorFlow's Meta-Dataset pixels (`CopaImageProcessor(decoder="meta-dataset")` uses it);
- `sampling`: the official test episodes, record for record (`official_sampler`).
"""

from .convert import (
    ConvertedSource,
    OutputFolderError,
    SplitSummary,
    convert_records,
    convert_source,
    discover_sources,
    push_source,
    source_features,
)
from .decoder import ImageDecodeError, decode_image, meta_dataset_pixels
from .records import (
    Example,
    RecordError,
    RecordWriter,
    count_records,
    iter_examples,
    iter_records,
    parse_example,
    scan_records,
    write_examples,
)
from .sampling import OfficialEpisodeSampler, official_sampler, rows_from_columns
from .specs import (
    SPLITS,
    BiLevelDatasetSpecification,
    DatasetSpecification,
    HierarchicalDatasetSpecification,
    load_dataset_spec,
)

__all__ = [
    "SPLITS",
    "BiLevelDatasetSpecification",
    "ConvertedSource",
    "DatasetSpecification",
    "Example",
    "HierarchicalDatasetSpecification",
    "ImageDecodeError",
    "OfficialEpisodeSampler",
    "OutputFolderError",
    "RecordError",
    "RecordWriter",
    "SplitSummary",
    "convert_records",
    "convert_source",
    "count_records",
    "decode_image",
    "discover_sources",
    "iter_examples",
    "iter_records",
    "load_dataset_spec",
    "meta_dataset_pixels",
    "official_sampler",
    "parse_example",
    "push_source",
    "rows_from_columns",
    "scan_records",
    "source_features",
    "write_examples",
]

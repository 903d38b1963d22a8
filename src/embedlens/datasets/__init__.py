"""Data sets: sources (synthetic, skimage, folder, manifest), robust image reading,
and the materialized on-disk form ``results/datasets/{name}/``."""

from embedlens.datasets.images import DEFAULT_MAX_PIXELS, BadImageError, load_rgb
from embedlens.datasets.materialize import (
    Dataset,
    load_dataset,
    materialize,
    token_cells,
    token_labels,
)
from embedlens.datasets.sources import (
    ManifestError,
    SourceData,
    SourceItem,
    folder_source,
    manifest_source,
    skimage_source,
)
from embedlens.datasets.synthetic import LABEL_TASKS, SyntheticExample, make_examples

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "BadImageError",
    "Dataset",
    "LABEL_TASKS",
    "ManifestError",
    "SourceData",
    "SourceItem",
    "SyntheticExample",
    "folder_source",
    "load_dataset",
    "load_rgb",
    "make_examples",
    "manifest_source",
    "materialize",
    "skimage_source",
    "token_cells",
    "token_labels",
]

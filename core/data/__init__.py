"""Data loading: folders, zips, MVTec layout, tables, IDX files, fingerprints and contamination protocols."""
from core.data.archive import extract_zip
from core.data.dataset import IMAGES, TABLE, Dataset, SkippedFile
from core.data.fingerprint import fingerprint_files, fingerprint_subset, fingerprint_table
from core.data.idx import (
    FASHION_MNIST_CLASSES,
    load_fashion_mnist,
    load_idx_images,
    materialize_images,
    read_idx,
)
from core.data.images import IMAGE_SUFFIXES, load_image_folder, read_rgb
from core.data.load import load_dataset
from core.data.protocol import ProtocolSplit, anomaly_count, softpatch_protocol, srr_protocol
from core.data.sources import (
    DEMO_DIR,
    MAX_UPLOAD_BYTES,
    UPLOAD_SUFFIXES,
    BuiltinSource,
    builtin_sources,
    prepare_builtin,
    resolve_server_folder,
    save_uploads,
)
from core.data.tables import TABLE_SUFFIXES, load_table, table_dataset

__all__ = [
    "IMAGES",
    "IMAGE_SUFFIXES",
    "TABLE",
    "TABLE_SUFFIXES",
    "FASHION_MNIST_CLASSES",
    "Dataset",
    "ProtocolSplit",
    "SkippedFile",
    "anomaly_count",
    "extract_zip",
    "fingerprint_files",
    "fingerprint_subset",
    "fingerprint_table",
    "load_dataset",
    "load_fashion_mnist",
    "load_idx_images",
    "load_image_folder",
    "load_table",
    "materialize_images",
    "read_idx",
    "read_rgb",
    "softpatch_protocol",
    "srr_protocol",
    "table_dataset",
    "BuiltinSource",
    "DEMO_DIR",
    "MAX_UPLOAD_BYTES",
    "UPLOAD_SUFFIXES",
    "builtin_sources",
    "prepare_builtin",
    "resolve_server_folder",
    "save_uploads",
]

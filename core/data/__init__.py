"""Data loading: folders, zips, MVTec layout, tables, IDX files, built-in sets, uploads, fingerprints and
contamination protocols."""
from core.data.archive import extract_zip
from core.data.builtin import DEMO_DIR, BuiltinSource, builtin_sources, prepare_builtin
from core.data.dataset import IMAGES, TABLE, Dataset, SkippedFile
from core.data.decode import read_rgb
from core.data.fingerprint import fingerprint_files, fingerprint_subset, fingerprint_table
from core.data.idx import (
    FASHION_MNIST_CLASSES,
    load_fashion_mnist,
    load_idx_images,
    materialize_images,
    read_idx,
)
from core.data.images import IMAGE_SUFFIXES, load_image_folder
from core.data.load import load_dataset
from core.data.protocol import ProtocolSplit, anomaly_count, softpatch_protocol, srr_protocol
from core.data.server_paths import resolve_server_folder
from core.data.tables import TABLE_SUFFIXES, load_table, table_dataset
from core.data.uploads import MAX_UPLOAD_BYTES, UPLOAD_SUFFIXES, save_uploads

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

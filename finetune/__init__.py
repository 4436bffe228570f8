"""finetune package."""

from finetune.datasets import (
    DatasetFormatError,
    DatasetManifest,
    SftDataset,
    build_sft_dataset,
    load_dataset_dir,
    read_openai_jsonl,
    save_dataset,
    write_openai_jsonl,
)

__all__ = [
    "DatasetFormatError",
    "DatasetManifest",
    "SftDataset",
    "build_sft_dataset",
    "load_dataset_dir",
    "read_openai_jsonl",
    "save_dataset",
    "write_openai_jsonl",
]

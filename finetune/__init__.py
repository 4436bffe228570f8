"""finetune package."""

from finetune.base import BaseModelInfo, bootstrap_base, build_tokenizer, corpus_texts, load_base
from finetune.config import TrainConfig
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
from finetune.plots import plot_losses
from finetune.review import (
    ReviewCounts,
    ReviewInputError,
    ReviewItem,
    ReviewNotFoundError,
    apply_review,
    editable_text,
    load_item,
    output_from_editable,
    review_counts,
    review_queue,
)
from finetune.train import TrainResult

__all__ = [
    "DatasetFormatError",
    "DatasetManifest",
    "SftDataset",
    "build_sft_dataset",
    "load_dataset_dir",
    "read_openai_jsonl",
    "save_dataset",
    "write_openai_jsonl",
    "BaseModelInfo",
    "TrainConfig",
    "TrainResult",
    "bootstrap_base",
    "build_tokenizer",
    "corpus_texts",
    "load_base",
    "plot_losses",
    "ReviewCounts",
    "ReviewInputError",
    "ReviewItem",
    "ReviewNotFoundError",
    "apply_review",
    "editable_text",
    "load_item",
    "output_from_editable",
    "review_counts",
    "review_queue",
]

"""Training data: formats (alpaca, chat, prompt_completion, text), tokenization with prompt
masking and packing, a tokenized-data cache, and `lorakit data check`."""

from lorakit.data.formats import FORMATS, detect_format, read_records, to_segments, validate_record
from lorakit.data.tokenize import collate, length_grouped_batches, load_datasets, tokenize_record

__all__ = [
    "FORMATS",
    "collate",
    "detect_format",
    "length_grouped_batches",
    "load_datasets",
    "read_records",
    "to_segments",
    "tokenize_record",
    "validate_record",
]

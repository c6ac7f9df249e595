"""Data pipeline: formats → templates → tokenisation (labels, image expansion, truncation) → collate."""

from mllm_kit.data.collate import PadCollator
from mllm_kit.data.dataset import LlavaDataset, Sample
from mllm_kit.data.formats import Record, load_records
from mllm_kit.data.sampler import grouped_indices
from mllm_kit.data.templates import Segment, Template, Turn, get_template
from mllm_kit.data.conversation import ConversationEncoder, Encoded, ImageSpan, truncate

__all__ = [
    "ConversationEncoder", "Encoded", "ImageSpan", "LlavaDataset", "PadCollator",
    "Record", "Sample", "Segment", "Template", "Turn", "get_template", "load_records", "grouped_indices", "truncate",
]

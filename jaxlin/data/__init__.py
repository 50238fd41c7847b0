"""jaxlin.data: grain input pipelines for language modelling and MQAR.

`build(config)` turns the `data` fields of `default_config()` into a `Data`
with a checkpointable train iterator and fixed validation batches; see
pipeline.py. The parts: tokenizers.py (byte / HF tokenizers / sentencepiece),
shakespeare.py (the embedded corpus), sources.py (the user's files),
packing.py (rows with segment ids), mqar.py (multi-query associative recall).
"""

from __future__ import annotations

from jaxlin.data.mqar import MqarSource, MqarTask, answer_accuracy
from jaxlin.data.packing import PackIterDataset, make_example
from jaxlin.data.pipeline import SOURCES, Data, build, default_config
from jaxlin.data.tokenizers import (ByteTokenizer, HuggingFaceTokenizer, SentencePieceTokenizer,
                                    Tokenizer, load_tokenizer)

__all__ = [
    "SOURCES", "ByteTokenizer", "Data", "HuggingFaceTokenizer", "MqarSource", "MqarTask",
    "PackIterDataset", "SentencePieceTokenizer", "Tokenizer", "answer_accuracy", "build",
    "default_config", "load_tokenizer", "make_example",
]

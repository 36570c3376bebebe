"""Dream's tokenizer without remote code.

The Hub's Dream repos name ``"tokenizer_class": "DreamTokenizer"`` and ship ``tokenization_dream.py``, a copy of
Qwen2's byte-level BPE tokenizer. Ours is Qwen2's tokenizer under that name, so
``AutoTokenizer.from_pretrained(dream_dir)`` works offline without ``trust_remote_code`` once ``models`` is
imported. It reads ``tokenizer.json`` when present, else ``vocab.json`` + ``merges.txt``.
"""

from __future__ import annotations

from transformers import Qwen2Tokenizer


class DreamTokenizer(Qwen2Tokenizer):
    """Qwen2 byte-level BPE tokenizer registered under Dream's class name."""

"""Shared fixtures. Tests run offline on CPU; nothing here touches a hub."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def smol_tokenizer():
    """The SmolLM2-135M-Instruct tokenizer (chat template, eos = pad = <|im_end|>), from the embedded GGUF."""
    from rrr.models import load_tokenizer_only

    return load_tokenizer_only("smollm2-135m")

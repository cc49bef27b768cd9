"""Shared fixtures. Tests run offline on CPU; nothing here touches a hub."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One intra-op thread: on a busy shared CPU, OpenMP threads contending for cores made tiny-model
# forwards ~50x slower (12 s vs 0.2 s for the same generate call). Set OMP_NUM_THREADS to override.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True, scope="session")
def _transformers_logs_to_the_session_stderr():
    """transformers binds its log handler to sys.stderr on first use; were that inside a CliRunner
    invocation, a later warning would write to CliRunner's closed stream ("--- Logging error ---" in
    the output of whichever CLI test logs next). Bind it once, to the session's stderr."""
    from transformers.utils import logging as hf_logging

    hf_logging.get_logger("transformers")


@pytest.fixture(scope="session")
def smol_tokenizer():
    """The SmolLM2-135M-Instruct tokenizer (chat template, eos = pad = <|im_end|>), from the embedded GGUF."""
    from rrr.models import load_tokenizer_only

    return load_tokenizer_only("smollm2-135m")


@pytest.fixture
def failures(tmp_path, smol_tokenizer):
    """A small Countdown failure set (trainer_fakes.write_failures) in this test's tmp dir."""
    from fakes import trainer as trainer_fakes

    return trainer_fakes.write_failures(tmp_path / "failures", smol_tokenizer)


@pytest.fixture(scope="session")
def tiny_model():
    """(model, tokenizer) of `model=tiny-random`: a seeded 2-layer Llama (fp32, CPU, eval mode) with the
    SmolLM2 tokenizer. Session-scoped: tests that change its weights or mode must restore them."""
    from rrr.config import compose
    from rrr.models import load_model

    return load_model(compose(["model=tiny-random", "model.device=cpu"]).model)

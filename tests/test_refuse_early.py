"""Settings transformers, peft or vLLM would reject are refused before the model loads, in one line and
with exit 2 (issue #23 item 4): one case per class through the real CLI, and the net that turns a library
error raised while the run is built into one line naming the settings."""

from __future__ import annotations

import json

import pytest
import torch

from test_cli_cases import COLLECT, EVAL, assert_one_line_error, cli, train_args
from rrr import model_info, models
from rrr.config import UserError, compose
from rrr.errors import library_errors

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="the device cases assume no visible GPU")


@pytest.fixture
def never_load(monkeypatch):
    """Refused early means before any weights: loading a model fails the test."""
    def load(*a, **k):
        raise AssertionError("the model was loaded before the setting was refused")
    monkeypatch.setattr(models, "_load_model", load)


def short_context_dir(tmp_path, positions: int = 64):
    """A model directory whose config.json allows `positions` tokens (no weights: never loaded)."""
    d = tmp_path / "short"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": positions,
                                               "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                               "num_attention_heads": 2, "num_key_value_heads": 2}))
    return d


@pytest.mark.parametrize("extra, needle", [
    (["model.lora.r=0"], "model.lora.r=0: the LoRA rank must be an integer >= 1"),
    (["model.lora.alpha=0"], "model.lora.alpha=0 must be > 0"),
    (["model.lora.dropout=1.5"], "model.lora.dropout=1.5 must lie in [0, 1)"),
    (["model.lora.target_modules=[]"], "model.lora.target_modules=[] must be a non-empty list"),
    (["model.lora.target_modules=[q_proj,qproj]"], "model.lora.target_modules: qproj match no Linear/Embedding"),
    (["model.lora.target_modules=[mlp]"], "mlp match no Linear/Embedding layer of model tiny-random; its layer "
                                          "names: down_proj, embed_tokens, gate_proj, k_proj"),
    (["train.sampling.attempt1.max_tokens=1000", "train.sampling.reflection.max_tokens=1000",
      "train.sampling.attempt2.max_tokens=48"],
     "train.sampling.attempt1.max_tokens=1000 + train.sampling.reflection.max_tokens=1000 + "
     "train.sampling.attempt2.max_tokens=48 = 2048 tokens do not fit the 2048-token context of model tiny-random"),
    (["engine=vllm", "engine.tensor_parallel_size=3"], "engine.tensor_parallel_size=3 must divide the 4 attention heads"),
    (["engine=vllm", "engine.data_parallel_size=0"], "engine.data_parallel_size=0 must be an integer >= 1"),
    (["engine=vllm", "engine.gpu_memory_utilization=1.5"], "engine.gpu_memory_utilization=1.5 must lie in (0, 1]"),
])
def test_train_settings_a_library_would_reject(tmp_path, failures, never_load, extra, needle):
    result = cli(*train_args(failures, *extra), f"out_root={tmp_path / 'out'}")
    assert_one_line_error(result, needle)
    assert result.exit_code == 2
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, needle", [
    ([*COLLECT, "collect.max_tokens=100000000"],
     "collect.max_tokens=100000000 tokens do not fit the 2048-token context of model tiny-random"),
    ([*EVAL, "eval.sampling.reflection.max_tokens=4096"], "eval.sampling.reflection.max_tokens=4096 + eval.sampling.attempt2.max_tokens=4 = 4104 tokens"),
    ([*COLLECT, "model.dtype=int8"], "model.dtype='int8'; valid choices: auto, float32, bfloat16, float16"),
    ([*COLLECT, "model.device=tpu"], "model.device='tpu'; valid choices: auto, cpu, cuda, cuda:N"),
    pytest.param([*COLLECT, "model.device=cuda:1"], "model.device=cuda:1: torch sees 0 CUDA device(s)", marks=NO_CUDA),
    pytest.param([*EVAL, "model.attn_implementation=flash_attention_2"],
                 "model.attn_implementation=flash_attention_2 needs a CUDA GPU and the flash_attn package",
                 marks=NO_CUDA),
    ([*EVAL, "model.attn_implementation=fast"], "model.attn_implementation='fast'; valid choices: eager, sdpa"),
    ([*COLLECT, "collect.temperature=-1"], "collect.temperature=-1 must be >= 0"),   # the earlier checks: 2 too
])
def test_collect_and_evaluate_settings_a_library_would_reject(tmp_path, never_load, args, needle):
    result = cli(*args, f"out_root={tmp_path / 'out'}")
    assert_one_line_error(result, needle)
    assert result.exit_code == 2
    assert not (tmp_path / "out").exists()


def test_context_is_read_from_the_models_config_json(tmp_path, never_load):
    """model.max_context (vLLM's max_model_len) beyond config.json's max_position_embeddings is refused,
    and the budgets are held to the context."""
    d = short_context_dir(tmp_path)
    args = [*COLLECT, f"model.path={d}", f"out_root={tmp_path / 'out'}"]
    assert_one_line_error(cli(*args), "model.max_context=2048 exceeds the 64 positions of model tiny-random "
                                      "(max_position_embeddings in its config.json)")
    assert_one_line_error(cli(*args, "model.max_context=64", "collect.max_tokens=64"),
                          "collect.max_tokens=64 tokens do not fit the 64-token context")
    assert model_info.architecture_config(compose(["model=tiny-random", f"model.path={d}"]).model)[
        "max_position_embeddings"] == 64


def test_a_library_error_while_building_the_run_is_one_line_naming_the_settings(tmp_path):
    """The net: a config.json transformers cannot read passes the early checks (its context is unknown)
    and fails inside transformers while loading: one line, exit 1, naming model.*."""
    d = tmp_path / "odd"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    result = cli(*COLLECT, f"model.path={d}", f"out_root={tmp_path / 'out'}")
    line = assert_one_line_error(result, "loading model tiny-random failed (")
    assert "check model.* (path, dtype, device, attn_implementation)" in line and result.exit_code == 1


def test_peft_errors_become_one_line_naming_model_lora(tiny_model):
    from omegaconf import OmegaConf

    import copy

    model = copy.deepcopy(tiny_model[0])
    cfg = OmegaConf.create({"lora": {"r": 0, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj"]}})
    with pytest.raises(UserError, match=r"^peft's LoRA setup failed \(ValueError: `r` should be a positive "
                                        r"integer.*check model.lora.\* \(r, alpha, dropout, target_modules\)"):
        models.apply_lora(model, cfg)


def test_the_net_passes_user_errors_and_keeps_the_traceback_on_request(monkeypatch):
    with pytest.raises(UserError, match="^mine$"):
        with library_errors("x", "y"):
            raise UserError("mine")
    monkeypatch.setenv("RRR_TRACEBACK", "1")
    with pytest.raises(ZeroDivisionError):
        with library_errors("x", "y"):
            1 / 0


def test_a_transformers_refusal_in_the_trainers_setup_names_the_setting(tmp_path, failures, monkeypatch):
    """The net at the trainer's own library calls: a model without gradient checkpointing support."""
    from transformers import PreTrainedModel

    def unsupported(self, **kwargs):
        raise ValueError(f"{type(self).__name__} does not support gradient checkpointing.")

    monkeypatch.setattr(PreTrainedModel, "gradient_checkpointing_enable", unsupported)
    result = cli(*train_args(failures), f"out_root={tmp_path / 'out'}")
    line = assert_one_line_error(result, "gradient checkpointing on model tiny-random failed (ValueError: "
                                         "LlamaForCausalLM does not support gradient checkpointing.)")
    assert "check train.gradient_checkpointing" in line and result.exit_code == 1
    assert not (tmp_path / "out").exists()

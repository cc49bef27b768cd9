"""Tokens through the backbone per update, per-episode path vs shared prefix, on a demo-like batch (counts only,
no model, no timing).

    python scripts/prefix_tokens.py --tokenizer DIR [--queries 2] [--reflections 62,82,96,22 36,42,40,22]

The batch is assembled by rrr's own code (`rrr.episode.assemble`, `collate`, `reflection_loss_mask`) from
BFCL live_simple prompts (the demo's training split, the demo's prompts and budgets): attempt 1 is the
query's reference call (its length stands for a failed call's), the feedback carries the verifier's reason,
and the reflections have the given lengths (default: the demo's step-1 groups in issue 20; a reflection
at the 96-token cap is truncated and carries no loss). Reflection and retry ids are filler: only lengths
matter. Both counts stop at each episode's last loss token, as the update does; "padded" is what the
micro-batches' rectangles hold (train.micro_batch_size rows per-episode, whole groups shared).
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import AutoTokenizer

from rrr.config import compose
from rrr.engines.base import Sample
from rrr.episode import Episode, assemble, collate, feedback_text, prompt_text, user_turn_delta
from rrr.grpo import reflection_loss_mask
from rrr.rollout import prompt_ids
from rrr.shared_prefix import plan_rows, prefix_groups, token_counts, whole_group_micro_batches
from rrr.tasks import get_task


def reference_call(example) -> str:
    calls = []
    for call in example.fields["ground_truth"]:
        (name, args), = call.items()
        calls.append(json.dumps({"name": name, "arguments": {k: v[0] for k, v in args.items()}}))
    return "\n".join(f"<tool_call>\n{c}\n</tool_call>" for c in calls)


def sample(ids: list[int], stop: int | None) -> Sample:
    return Sample(token_ids=ids + ([stop] if stop is not None else []), finish_reason="stop" if stop else "length")


def episodes(tokenizer, cfg, reflection_lengths: list[list[int]]) -> list[Episode]:
    task = get_task("function_calling")
    examples = task.load(cfg.task, "train", len(reflection_lengths), int(cfg.seed))
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    cap = int(cfg.train.sampling.reflection.max_tokens)
    filler = tokenizer(" the", add_special_tokens=False)["input_ids"][0]
    out = []
    for q, (example, lengths) in enumerate(zip(examples, reflection_lengths)):
        call = reference_call(example)
        attempt1 = sample(tokenizer(call, add_special_tokens=False)["input_ids"], end)
        verdict = task.verify(example, call.replace('"', "'", 2))         # a wrong call: the verifier's reason
        feedback = user_turn_delta(tokenizer, feedback_text(cfg.prompts, verdict.reason))
        retry = user_turn_delta(tokenizer, prompt_text(cfg.prompts, "retry"))
        for g, n in enumerate(lengths):
            truncated = n >= cap
            reflection = sample([filler] * (cap if truncated else n - 1), None if truncated else end)
            t = assemble(prompt_ids(tokenizer, task, example, cfg.prompts), attempt1, feedback, reflection, retry,
                         attempt1)
            out.append(Episode(example.id, q, g, list(t.ids), list(t.segments), list(t.logprobs),
                               truncated={"reflection": truncated, "attempt2": False}))
    return out


def padded(batch, mask, micro_batches, shared: bool) -> int:
    total = 0
    for mb in micro_batches:
        idx = torch.tensor(mb)
        cols = mask[idx].any(0).nonzero()
        width = int(cols.max()) + 1 if len(cols) else 1
        ids, attn, m, segs = (x[idx, :width] for x in (batch["input_ids"], batch["attention_mask"], mask, batch["segment_ids"]))
        if shared:
            rows = plan_rows(ids, attn, m, segs)
            total += len(rows) * max((r.length for r in rows), default=1)
        else:
            total += len(mb) * width
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True, help="a Qwen2.5(-Coder) tokenizer directory")
    ap.add_argument("--reflections", nargs="+", default=["62,82,96,22", "36,42,40,22"],
                    help="per group, comma-separated reflection lengths (tokens, end-of-turn included)")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_intermixed_args()
    cfg = compose(["experiment=demo", "task=function_calling", *a.overrides])
    tokenizer = AutoTokenizer.from_pretrained(a.tokenizer)
    lengths = [[int(x) for x in r.split(",")] for r in a.reflections]
    batch = collate(episodes(tokenizer, cfg, lengths), tokenizer.pad_token_id)
    mask = reflection_loss_mask(batch["segment_ids"], batch["reflection_truncated"])
    groups = [rows for rows, _ in prefix_groups(batch["input_ids"], batch["attention_mask"], batch["segment_ids"])]
    mbs = int(cfg.train.micro_batch_size)
    for q, (rows, p) in enumerate(prefix_groups(batch["input_ids"], batch["attention_mask"], batch["segment_ids"])):
        c = token_counts(plan_rows(*(x[rows] for x in (batch["input_ids"], batch["attention_mask"], mask,
                                                      batch["segment_ids"]))))
        print(f"group {q}: shared prefix {p} tokens, reflections {lengths[q]}: per episode {c['episode_tokens']}, "
              f"shared {c['packed_tokens']}")
    c = token_counts(plan_rows(batch["input_ids"], batch["attention_mask"], mask, batch["segment_ids"]))
    per_mb = [list(x) for x in torch.arange(len(mask)).split(mbs)]
    row = {**c, "saved_tokens": c["episode_tokens"] - c["packed_tokens"],
           "episode_tokens_padded": padded(batch, mask, [[int(i) for i in m] for m in per_mb], False),
           "packed_tokens_padded": padded(batch, mask, whole_group_micro_batches(groups, mbs), True)}
    print(json.dumps(row))


if __name__ == "__main__":
    main()

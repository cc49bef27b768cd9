"""Mutation check for the RL wiring tests (issue #12, item 2): apply each mutation to the source, run the
tests meant to catch it, restore the file. Every mutation must make its tests fail.

    PYTHONPATH=. python scripts/mutation_check.py          # prints one line per mutation, exit 1 if one survives
    PYTHONPATH=. python scripts/mutation_check.py canary tis resample distributed   # only these areas

Areas: wiring (issue #12), and from issue #22: canary, tis, resample, adapter, distributed (the last spawns 2 gloo
ranks per mutation, ~1 min each).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORE = "tests/test_trainer_core.py"
CANARY = "tests/test_sync_canary.py"
WIRING = "tests/test_rl_wiring.py"
DIST_FAST = "tests/test_distributed.py::test_one_step_with_an_empty_share_and_with_fsdp_idle_steps_gives_the_single_process_step"
SHARED = "tests/test_shared_prefix.py"
WIRING_12 = [  # (name, file, original, mutant, tests)
    ("KL sign flipped", "rrr/grpo.py", "return pg_loss + beta * kl_loss, stats", "return pg_loss - beta * kl_loss, stats",
     [CORE + "::test_loss_is_policy_loss_plus_beta_times_kl"]),
    ("beta ignored", "rrr/grpo.py", "return pg_loss + beta * kl_loss, stats", "return pg_loss + kl_loss, stats",
     [CORE + "::test_loss_is_policy_loss_plus_beta_times_kl"]),
    ("advantages flattened over kept groups (old line)", "rrr/trainer.py",
     "return [ep for ep, _ in pairs], torch.stack([a for _, a in pairs])",
     "return [ep for ep, _ in pairs], advantages[keep].flatten()",
     [CORE + "::test_training_batch_pairs_each_episode_with_its_own_advantage_and_drops_unscorable"]),
    ("advantage of the wrong member", "rrr/trainer.py", "pairs = [(ep, advantages[q, g])",
     "pairs = [(ep, advantages[q, -1 - g])", [CORE + "::test_training_batch_pairs_each_episode_with_its_own_advantage_and_drops_unscorable",
                                            CORE + "::test_the_update_gets_each_episodes_advantage_in_the_real_step"]),
    ("unscorable retry scored 0", "rrr/trainer.py", 'return float("nan") if episode.reward is None',
     "return 0.0 if episode.reward is None", [CORE + "::test_an_unscorable_retry_is_nan_never_zero"]),
    ("unscorable reflection kept in the mask", "rrr/trainer.py", "for g, ep in enumerate(group) if not torch.isnan(rewards[q, g])]",
     "for g, ep in enumerate(group)]", [CORE + "::test_training_batch_pairs_each_episode_with_its_own_advantage_and_drops_unscorable"]),
    ("resample keeps a zero-std draw", "rrr/trainer.py", "if not grpo.zero_std_groups(fresh_rewards[j:j + 1])[0]:",
     "if grpo.zero_std_groups(fresh_rewards[j:j + 1])[0]:", [CORE + "::test_resample_replaces_only_zero_std_groups_with_their_own_first_varied_draw"]),
    ("resample writes the wrong group", "rrr/trainer.py", "groups[q], rewards[q] = fresh[j], fresh_rewards[j]",
     "groups[j], rewards[j] = fresh[j], fresh_rewards[j]", [CORE + "::test_resample_replaces_only_zero_std_groups_with_their_own_first_varied_draw"]),
    ("epoch wrap repeats a query", "rrr/failure_set.py", "self.epoch + 1, 0, tuple(out)", "self.epoch + 1, 0, ()",
     ["tests/test_failure_set.py::test_seed_2_n_3_batch_2_no_longer_draws_the_same_query_twice"]),
    ("reference = bare base from an adapter", "rrr/train_setup.py",
     'if cfg.train.finetune == "lora" and not starts_from_adapter(cfg):', 'if cfg.train.finetune == "lora":',
     ["tests/test_train_setup.py::test_reference_of_a_run_started_from_an_adapter_is_that_adapter_frozen"]),
    ("unscorable attempt 1 counted as a failure", "rrr/trainer.py",
     "scored = [bool(a.verdict.correct) for a in online if a.verdict is not rollout.UNSCORABLE]",
     "scored = [bool(a.verdict.correct) for a in online]",
     [CORE + "::test_online_unscorable_attempt1_is_counted_apart_not_as_a_failure"]),
    ("stored prompt ids not compared", "rrr/failure_set.py", "        if list(s[\"prompt_token_ids\"]) != rebuilt:",
     "        if False:", [CORE + "::test_stored_prompt_ids_that_differ_from_the_rebuilt_prompt_are_refused"]),
    ("no_reward ignored", "rrr/leak.py", "return torch.where(leaks & ~rewards.isnan(), torch.zeros_like(rewards), rewards)",
     "return rewards", [CORE + "::test_leak_policy_zeroes_leaking_rewards_only_under_no_reward"]),
    ("shared prefix: suffix position ids off by one", "rrr/shared_prefix.py", "torch.arange(p, p + s), j + 1",
     "torch.arange(p + 1, p + s + 1), j + 1", [SHARED + "::test_shared_prefix_equals_per_episode_logprobs_loss_and_gradients",
                                              SHARED + "::test_pack_restarts_suffix_positions_at_p_and_isolates_suffixes"]),
    ("shared prefix: a suffix attends another suffix", "rrr/shared_prefix.py",
     "((owner[:, None, :] == 0) | (owner[:, None, :] == owner[:, :, None]))",
     "((owner[:, None, :] >= 0) | (owner[:, None, :] == owner[:, :, None]))",
     [SHARED + "::test_shared_prefix_equals_per_episode_logprobs_loss_and_gradients"]),
]
CANARY_22 = [
    ("NaN canary passes", "rrr/sync.py", "    if not math.isfinite(diff):", "    if False:", [CANARY]),
    ("canary sum weighted as a token mean", "rrr/train_log.py",
     "totals[key] = totals.get(key, 0.0) + value     # a sum over tokens", "totals[key] = totals.get(key, 0.0) + value * stats['reflection_tokens']  #",
     [CANARY]),
    ("canary a mean per micro-batch", "rrr/train_log.py", "return torch.where(mask, (logp - sampler_logp).abs(), 0).sum().item()",
     "return torch.where(mask, (logp - sampler_logp).abs(), 0).sum().item() / max(int(mask.sum()), 1)", [CANARY]),
    ("canary rescaled before the check", "rrr/train_log.py", '"sync/logprob_diff": update["sampler_logp_diff"],',
     '"sync/logprob_diff": 0.5 * update["sampler_logp_diff"],', [CANARY]),
    ("canary a signed gap", "rrr/train_log.py", "return torch.where(mask, (logp - sampler_logp).abs(), 0).sum().item()",
     "return torch.where(mask, (logp - sampler_logp), 0).sum().item()", [CANARY]),
]
TIS_22 = [
    ("TIS ratio inverted", "rrr/trainer.py", "is_weights=grpo.tis_weights(logp, sampler_logp, m, t.is_cap)",
     "is_weights=grpo.tis_weights(sampler_logp, logp, m, t.is_cap)", [WIRING]),
    ("TIS cap ignored", "rrr/trainer.py", "is_weights=grpo.tis_weights(logp, sampler_logp, m, t.is_cap)",
     "is_weights=grpo.tis_weights(logp, sampler_logp, m, 1e9)", [WIRING]),
    ("TIS stats inverted", "rrr/trainer.py", "stats.update(grpo.tis_stats(logp, sampler_logp, m, t.is_cap))",
     "stats.update(grpo.tis_stats(sampler_logp, logp, m, t.is_cap))", [WIRING]),
]
RESAMPLE_22 = [
    ("leak policy not applied to re-draws", "rrr/trainer.py", "fresh_rewards = group_scores(ctx, redo_queries, fresh)",
     "fresh_rewards = group_rewards(fresh, ctx.group_size)", [WIRING]),
    ("leak check reads the retry", "rrr/leak.py", 'ep.texts.get("reflection")', 'ep.texts.get("attempt2")', [WIRING]),
    ("zero-std groups trained after re-draws", "rrr/trainer.py", 'if t.zero_std in ("skip", "resample", "dynamic") else',
     'if t.zero_std in ("skip", "dynamic") else', [WIRING]),
    ("re-draw with the first draw's seed", "rrr/trainer.py", 'seed=derive_seed(ctx.seed, "resample", attempt)',
     "seed=ctx.seed", [WIRING]),
    ("every re-draw with one seed", "rrr/trainer.py", 'seed=derive_seed(ctx.seed, "resample", attempt)',
     'seed=derive_seed(ctx.seed, "resample", 1)', [WIRING]),
]
DISTRIBUTED_22 = [
    ("an empty share collated", "rrr/trainer.py", "batch = collate(episodes, tokenizer.pad_token_id) if episodes else EMPTY_BATCH",
     "batch = collate(episodes, tokenizer.pad_token_id)", [DIST_FAST]),
    ("FSDP averages gradients", "rrr/fsdp.py", "module.set_gradient_divide_factor(1.0)",
     "module.set_gradient_divide_factor(2.0)", [DIST_FAST]),
    # "(0.0 * logp.sum())" -> "logp.sum()" is an equivalent mutant on tiny-random: its pad embedding is 0
    # (padding_idx), so the idle step's hidden states and every gradient are exactly 0 (measured). Dropping
    # the idle step's reference forward leaves the reference's FSDP all-gathers unpaired: a collective error
    # or the RRR_DIST_TIMEOUT_S timeout (up to 5 min).
    ("FSDP idle step skips the reference", "rrr/fsdp.py", "        reference(ids, attn, mask, 1.0)", "        pass",
     [DIST_FAST]),
]
ADAPTER_22 = [
    ("full fine-tune from an adapter trains the adapter", "rrr/train_setup.py",
     "        model = merge_adapter(model)                 # model.path = an adapter", "        pass  #",
     ["tests/test_train_setup.py::test_full_fine_tune_from_an_adapter_merges_it_and_trains_every_weight"]),
    ("FSDP's fresh copy keeps the adapter", "rrr/fsdp.py", "return merge_adapter(load_for_training(cfg.model, cfg.train.finetune, for_training=False)[0])",
     "return load_for_training(cfg.model, cfg.train.finetune, for_training=False)[0]", ["tests/test_train_setup.py::test_full_fine_tune_from_an_adapter_merges_it_and_trains_every_weight"]),
]
AREAS = {"wiring": WIRING_12, "adapter": ADAPTER_22, "canary": CANARY_22, "tis": TIS_22, "resample": RESAMPLE_22,
         "distributed": DISTRIBUTED_22}


def main(areas: list[str]) -> int:
    unknown = set(areas) - set(AREAS)
    if unknown:
        print(f"unknown area(s) {sorted(unknown)}; choose from {', '.join(AREAS)}")
        return 2
    mutations = [m for area in (areas or AREAS) for m in AREAS[area]]
    survived = 0
    for name, rel, original, mutant, tests in mutations:
        path = ROOT / rel
        source = path.read_text()
        if source.count(original) != 1:
            print(f"SKIPPED  {name}: the original line is not (exactly once) in {rel}")
            survived += 1
            continue
        path.write_text(source.replace(original, mutant))
        try:
            result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                                    cwd=ROOT, capture_output=True, text=True)
        finally:
            path.write_text(source)
        caught = result.returncode != 0
        survived += not caught
        print(f"{'caught  ' if caught else 'SURVIVED'} {name}  ({rel})", flush=True)
    print(f"{len(mutations) - survived} of {len(mutations)} mutations caught")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

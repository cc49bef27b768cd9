"""Mutation check for the RL wiring tests (issue #12, item 2): apply each mutation to the source, run the
tests meant to catch it, restore the file. Every mutation must make its tests fail.

    PYTHONPATH=. python scripts/mutation_check.py          # prints one line per mutation, exit 1 if one survives
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORE = "tests/test_trainer_core.py"
SHARED = "tests/test_shared_prefix.py"
MUTATIONS = [  # (name, file, original, mutant, tests)
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


def main() -> int:
    survived = 0
    for name, rel, original, mutant, tests in MUTATIONS:
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
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())

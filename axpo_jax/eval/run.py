"""The `eval` mode: evaluates a checkpoint on the paper's benchmarks and writes the results.

    python launch.py --config configs/eval.py --config.checkpoint=/path/to/folder --config.benchmarks=vstar,mmsearch

Reads each benchmark's published files (under `config.data_dir`, or `config.data.<name>`), loads the policy (a
transformers folder, or an orbax checkpoint's parameters over it), runs batches of questions x samples through
the agent loop with image_zoom_in and python (and search for the search benchmarks, when a backend is configured),
and writes to `config.output_dir`:

- `records/<benchmark>.jsonl`: one record per finished question (appended as batches finish; a rerun with the
  same output directory skips them, see `axpo_jax.eval.runner` for why the results then equal an uninterrupted run),
- `results.json`: per-benchmark metrics (Pass@1, Pass@k, tool use, failures per category, turns), the average,
  the settings, the checkpoint, and notes on anything that differs from the paper's setup,
- `results.md`: the same as the paper's table plus a tool-use table.

`run_config.json` records what determines the results (checkpoint, settings, seed, batch size, tools, prompts,
judge); a rerun with different values into the same output directory stops with an error naming them.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import sys
import time

from axpo_jax.modes import (ModeError, check_run_settings, checked_attention, config_fields, require_ints_at_least,
                            require_positive_ints)


def cut_short_note(display_name: str, finish_reasons: dict[str, int], max_total_tokens: int) -> str | None:
    """A note for the log and the report when samples ended before the policy could answer for a reason of the
    run's making rather than the policy's (the agent loop's own log is silent in eval): prompts longer than a row's
    cache, or tool observations the processor refused. Such samples are scored wrong."""
    parts = []
    if finish_reasons.get("prompt_too_long"):
        parts.append(f"{finish_reasons['prompt_too_long']} did not fit the {max_total_tokens}-token cache "
                     f"(config.max_total_tokens)")
    if finish_reasons.get("bad_observation"):
        parts.append(f"{finish_reasons['bad_observation']} ended on a tool observation the processor refused")
    if not parts:
        return None
    total = sum(finish_reasons.values())
    return f"{display_name}: of {total} samples, " + "; ".join(parts) + " (scored wrong)"


def _log(message: str) -> None:
    from axpo_jax.parallel import distributed

    if distributed.is_primary():  # multi-host: every process runs the same evaluation; one reports it
        print(f"[eval] {message}", file=sys.stderr, flush=True)


def _split(text: str) -> list[str]:
    return [part.strip() for part in str(text).split(",") if part.strip()]


def _load_items(config, name: str):
    from axpo_jax.eval.benchmarks import load_benchmark

    override = config.data.get(name, "") if "data" in config else ""
    return load_benchmark(name, config.data_dir, override, config.max_questions)


def load_judge(spec: str):
    """`package.module:name` -> the callable judge(question, reference, prediction) -> score in [0, 1]."""
    if not spec:
        return None
    module_name, _, attribute = spec.partition(":")
    try:
        judge = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ModeError(f"config.judge={spec!r}: cannot import it ({error}); expected 'package.module:callable'")
    if not callable(judge):
        raise ModeError(f"config.judge={spec!r} is not callable")
    return judge


def search_backend(config):
    """(backend or None, description)."""
    from axpo_jax.tools.search import BM25Backend, HTTPSearchBackend

    if config.search_corpus:
        return BM25Backend.from_jsonl(config.search_corpus), f"BM25 over {os.path.abspath(config.search_corpus)}"
    if config.search_endpoint:
        backend = HTTPSearchBackend(config.search_endpoint, api_key_env=config.search_api_key_env or None)
        return backend, f"HTTP search API {config.search_endpoint}"
    return None, "none"


def benchmark_tools(spec, base_tools: list[str], search) -> tuple[list[str], str | None]:
    """The tools a benchmark is run with, and a note when it needs search but no backend is configured (it then
    runs without the search tool, which the results say)."""
    if not spec.needs_search:
        return list(base_tools), None
    if search is not None:
        return [*base_tools, "search"], None
    return list(base_tools), (f"{spec.display_name} was run WITHOUT the search tool: no search backend is configured "
                              f"(set config.search_corpus to a JSONL corpus for BM25, or config.search_endpoint and "
                              f"config.search_api_key_env); the paper used web search")


def run(config) -> dict:
    import jax
    from tqdm.auto import tqdm

    from axpo_jax.data.tasks import check_same_records, read_on_every_process
    from axpo_jax.eval.benchmarks import BENCHMARKS, BenchmarkDataError
    from axpo_jax.eval.metrics import average_metrics, benchmark_metrics, flat_metrics
    from axpo_jax.eval.policy import load_policy
    from axpo_jax.eval.records import RecordStore
    from axpo_jax.eval.report import markdown_report
    from axpo_jax.eval.runner import benchmark_key, make_agent, run_benchmark
    from axpo_jax.eval.scoring import describe_scorer
    from axpo_jax.eval.settings import EvalSettings
    from axpo_jax.models.qwen3_vl import dtype_named
    from axpo_jax.parallel import distributed
    from axpo_jax.parallel.mesh import mesh_from_config
    from axpo_jax.tools.executor import ToolExecutor
    from axpo_jax.tools.registry import build_registry

    started = time.perf_counter()
    try:
        settings = EvalSettings.from_config(config)
        require_positive_ints(config, "batch_size")
        require_ints_at_least(config, 0, "max_image_pixels")
        names = _split(config.benchmarks)
        unknown = [name for name in names if name not in BENCHMARKS]
        if unknown or not names:
            raise ModeError(f"config.benchmarks={config.benchmarks!r}: unknown {unknown or '(none given)'}; "
                            f"the benchmarks are {','.join(BENCHMARKS)}")
        # data problems surface before the model loads, on every process at once
        data = {name: read_on_every_process(f"benchmark {name}", lambda name=name: _load_items(config, name),
                                            compare=False)
                for name in names}
        for name, (path, items) in data.items():  # every process asks its share of the same questions
            check_same_records(f"benchmark {name} ({path})", items)
    except (BenchmarkDataError, ValueError) as error:
        raise ModeError(str(error)) from error
    judge = load_judge(config.judge)
    with config_fields("dtype"):
        dtype = dtype_named(config.dtype)
    attention = checked_attention(config, dtype)
    base_tools = _split(config.tools)
    if "search" in base_tools:
        raise ModeError("config.tools must not list search: it is added to the benchmarks that need it "
                        "(set config.search_corpus or config.search_endpoint)")
    try:
        search, search_text = search_backend(config)
        mesh = mesh_from_config(config.mesh.to_dict())
        model, processor, source = load_policy(config.checkpoint, orbax_dir=config.orbax_dir,
                                               orbax_step=None if config.orbax_step < 0 else config.orbax_step,
                                               dtype=dtype, mesh=mesh, max_image_pixels=config.max_image_pixels)
        model.use_fused_attention_(attention)
    except (FileNotFoundError, ValueError) as error:
        raise ModeError(str(error)) from error
    model_name = config.model_name or os.path.basename(os.path.normpath(config.checkpoint)) + (
        f" (orbax step {source['orbax_step']})" if "orbax_step" in source else "")

    primary = distributed.is_primary()
    output_dir = os.path.abspath(config.output_dir)
    # every process reads the folder's record (an output_dir on each host's own disk can hold another run's on one
    # host only), and all of them refuse together
    distributed.fail_together("output_dir", lambda: check_run_settings(
        os.path.join(output_dir, "run_config.json"), write=primary, holds="results", option="output_dir", settings={
            **source, "dtype": config.dtype, "settings": dataclasses.asdict(settings), "seed": config.seed,
            "batch_size": config.batch_size, "tools": base_tools, "search": search_text,
            "system_prompt": config.system_prompt, "prompt_suffix": config.prompt_suffix, "judge": config.judge,
            # only when set, so folders written before the field existed still resume
            **({"max_image_pixels": config.max_image_pixels} if config.max_image_pixels else {})}),
        ModeError)
    _log(f"evaluating {model_name} on {', '.join(names)} ({settings.describe()}); writing to {output_dir}")

    notes = []
    agents = {}
    metrics, details = {}, {}
    rng = jax.random.key(config.seed)
    for name in names:
        spec = BENCHMARKS[name]
        path, items = data[name]
        tools, note = benchmark_tools(spec, base_tools, search)
        if note:
            notes.append(note)
            _log(note)
        if tuple(tools) not in agents:
            registry = build_registry(tools, search_backend=search if "search" in tools else None)
            agents[tuple(tools)] = make_agent(model, processor, ToolExecutor(registry, timeout_s=config.tool_timeout_s),
                                              settings, system_prompt=config.system_prompt or None, mesh=mesh,
                                              log=lambda message: None)
        store = RecordStore(os.path.join(output_dir, "records", f"{name}.jsonl"))
        with tqdm(total=len(items), desc=spec.display_name, unit="question", file=sys.stderr, dynamic_ncols=True,
                  mininterval=1.0, disable=not primary) as progress:
            records, ran = run_benchmark(agents[tuple(tools)], items, benchmark_key(rng, name), settings, judge=judge,
                                         batch_size=config.batch_size, store=store, prompt_suffix=config.prompt_suffix,
                                         save_responses=config.save_responses, progress=progress)
        metrics[name] = benchmark_metrics(records, settings.pass_k)
        cut_short = cut_short_note(spec.display_name, metrics[name]["finish_reasons"], settings.max_total_tokens)
        if cut_short:
            notes.append(cut_short)
            _log(cut_short)
        scorers = sorted({describe_scorer(item, judge) for item in items})
        if any("none configured" in s for s in scorers):
            notes.append(f"{spec.display_name}: its authors graded with an LLM judge; none is configured "
                         f"(config.judge), so it was scored by {', '.join(scorers)}")
        details[name] = {"data": os.path.abspath(path), "tools": tools, "scorers": scorers,
                         "questions_run": ran, "questions_resumed": len(items) - ran}
        _log(f"{spec.display_name}: " + ", ".join(f"pass@{k} {metrics[name][f'pass@{k}']:.3f}"
                                                  for k in settings.pass_k)
             + f", tool use {metrics[name]['tool_use_rate']:.2f} ({ran} questions run, {len(items) - ran} resumed)")

    for agent in agents.values():
        agent.executor.close()  # python kernels and worker threads

    results = {
        "model": model_name, "source": source, "settings": dataclasses.asdict(settings), "seed": config.seed,
        "search": search_text, "judge": config.judge or None,
        "benchmarks": {name: {**details[name], "metrics": metrics[name]} for name in names},
        "average": average_metrics(metrics, settings.pass_k), "notes": notes,
    }
    results_path, report_path = os.path.join(output_dir, "results.json"), os.path.join(output_dir, "results.md")
    if primary:  # every process holds every record (runner.run_benchmark gathers them); one writes the results
        with open(results_path, "w") as file:
            json.dump(results, file, indent=1)
        with open(report_path, "w") as file:
            file.write(markdown_report(model_name, metrics, settings.pass_k, settings_text=settings.describe(),
                                       notes=notes))
    distributed.sync("eval results written")  # no process returns before the files exist
    _log(f"wrote {results_path} and {report_path}")
    return {
        **flat_metrics(metrics, settings.pass_k),
        "results": results_path,
        "report": report_path,
        "questions_run": sum(d["questions_run"] for d in details.values()),
        "questions_resumed": sum(d["questions_resumed"] for d in details.values()),
        "seconds": round(time.perf_counter() - started, 1),
    }

"""The paper's nine evaluation benchmarks (docs/AXPO.md §5), each read from the files its authors publish.

`BENCHMARKS` maps a benchmark's name (what `--config.benchmarks` lists) to its reader, the display name the
paper's table uses, where its files sit under `config.data_dir` when downloaded as published, and whether it
needs the search tool. One module per benchmark holds its reader and, in its docstring, the published files and
fields it reads and their source.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

from axpo_jax.eval.benchmarks.base import BenchmarkDataError, EvalItem, ImageSource, check_images
from axpo_jax.eval.benchmarks.dynamath import read_dynamath
from axpo_jax.eval.benchmarks.hrbench import read_hrbench4k, read_hrbench8k
from axpo_jax.eval.benchmarks.hrmmsearch import read_hrmmsearch
from axpo_jax.eval.benchmarks.mathvision import read_mathvision
from axpo_jax.eval.benchmarks.mathvr import read_mathvr
from axpo_jax.eval.benchmarks.mmsearch import read_mmsearch
from axpo_jax.eval.benchmarks.visualprobe import read_visualprobe
from axpo_jax.eval.benchmarks.vstar import read_vstar


@dataclasses.dataclass(frozen=True)
class BenchmarkSpec:
    name: str
    display_name: str  # the paper's column header
    reader: Callable[[str], list[EvalItem]]
    default_path: str  # relative to config.data_dir: the published download, folder or file
    needs_search: bool = False


# In the paper's column order: math, high-resolution perception, search.
BENCHMARKS: dict[str, BenchmarkSpec] = {spec.name: spec for spec in [
    BenchmarkSpec("mathvision", "MathVision", read_mathvision, "MathVision"),
    BenchmarkSpec("dynamath", "DynaMath", read_dynamath, "DynaMath_Sample"),
    BenchmarkSpec("mathvr", "Math-VR", read_mathvr, "Math-VR-bench"),
    BenchmarkSpec("vstar", "V*", read_vstar, "vstar_bench"),
    BenchmarkSpec("visualprobe", "VisualProbe", read_visualprobe, "VisualProbe_Hard"),
    BenchmarkSpec("hrbench4k", "HR-4K", read_hrbench4k, "HR-Bench/hr_bench_4k.tsv"),
    BenchmarkSpec("hrbench8k", "HR-8K", read_hrbench8k, "HR-Bench/hr_bench_8k.tsv"),
    BenchmarkSpec("hrmmsearch", "HR-MMSearch", read_hrmmsearch, "HR-MMSearch", needs_search=True),
    BenchmarkSpec("mmsearch", "MMSearch", read_mmsearch, "MMSearch/end2end.parquet", needs_search=True),
]}


def benchmark_spec(name: str) -> BenchmarkSpec:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; the benchmarks are {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


def load_benchmark(name: str, data_dir: str, path: str = "", max_questions: int = 0) -> tuple[str, list[EvalItem]]:
    """(the path read, its questions): `path` if given, else the published download's place under `data_dir`;
    only the first `max_questions` when > 0. Their images are decoded once here (`check_images`): a truncated
    one stops the run now, not hours into it."""
    path = path or os.path.join(data_dir, benchmark_spec(name).default_path)
    items = benchmark_spec(name).reader(path)
    if not items:
        raise BenchmarkDataError(f"benchmark {name}: {path} holds no questions")
    items = items[:max_questions] if max_questions > 0 else items
    check_images(items)
    return path, items


__all__ = ["BENCHMARKS", "BenchmarkDataError", "BenchmarkSpec", "EvalItem", "ImageSource", "benchmark_spec",
           "load_benchmark"]

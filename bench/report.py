"""Regenerate ``BENCHMARKS.md`` from ``bench/results/*.json`` (``python -m bench.report``).

Nothing in the table is typed by hand: each row names a figure and the JSON path it is read from, and
the table prints that path beside the value, so every figure traces to its results file. A results
file without a section below is shown through its ``headline`` mapping (label -> value), the
convention for new benchmarks.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench.common import RESULTS
from mtrec.io import atomic_write_text

OUT = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"

Path_ = tuple[str | int, ...]  # keys and list indexes, e.g. ("results", 1, "rows_per_s")
Row = tuple[str, Path_]  # (figure, where its value is)


def lookup(doc: Any, path: Path_) -> Any:
    """The value at ``path``; KeyError naming the missing part."""
    value = doc
    for part in path:
        try:
            value = value[part]
        except (KeyError, IndexError, TypeError) as e:
            raise KeyError(f"{show(path)}: no {part!r}") from e
    return value


def show(path: Path_) -> str:
    """``("results", 1, "rows_per_s")`` -> ``results[1].rows_per_s``."""
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


def fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value).lower() if isinstance(value, bool) else "n/a"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        a = abs(value)
        if a >= 1000:
            return f"{value:,.0f}"
        return f"{value:.1f}" if a >= 10 else f"{value:.3f}" if a >= 0.01 else f"{value:.2g}"
    return str(value)


def _data(doc: dict) -> Iterator[Row]:
    for i, r in enumerate(doc["results"]):
        yield f"synthetic generator, {r['rows']:,} rows: rows/s", ("results", i, "rows_per_s")
        yield f"synthetic generator, {r['rows']:,} rows: peak RSS (MB)", ("results", i, "peak_rss_mb")


def _model(doc: dict) -> Iterator[Row]:
    for arch, runs in doc["results"].items():
        for run in ("frozen_minilm_384d", "finetune_minilm_top2"):
            if run in runs:
                yield f"{arch}, {run}: forward+backward samples/s", ("results", arch, run, "samples_per_s")


def _per_task_runs(doc: dict, runs_key: str = "runs") -> Iterator[Row]:
    for name, run in doc[runs_key].items():
        for task, m in run.items():
            if isinstance(m, dict):
                for metric in ("auc", "cold_auc"):
                    if metric in m:
                        yield f"{name}: {task} {metric}", (runs_key, name, task, metric)
        if "samples_per_s" in run:
            yield f"{name}: training samples/s", (runs_key, name, "samples_per_s")
        if "encode_s" in run:
            yield f"{name}: one-time encoding of the items (s)", (runs_key, name, "encode_s")


def _training(doc: dict) -> Iterator[Row]:
    for name in doc["runs"]:
        yield f"{name}: samples/s", ("runs", name, "samples_per_s")
        if "input_wait_frac" in doc["runs"][name]:
            yield f"{name}: share of the epoch waiting for input", ("runs", name, "input_wait_frac")
    for key in sorted(k for k in doc if k.startswith(("scaling_efficiency", "frozen_vs"))):
        yield key.replace("_", " "), (key,)


def _control(doc: dict) -> Iterator[Row]:
    summary = doc.get("summary", {})
    for key, target in summary.get("targets", {}).items():
        bound = f"{'at least' if target['kind'] == 'min' else 'at most'} {target['bound']:g}"
        yield f"{summary['policy']}: {key.replace('_', ' ')} (target {bound})", ("summary", key)
        yield f"{summary['policy']}: {key.replace('_', ' ')} meets its target", ("summary", "met", key)
    for world, by_traffic in doc["table"].items():
        for n, by_policy in by_traffic.items():
            for policy, cell in by_policy.items():
                if not math.isnan(cell["gap_closed"]["median"]):  # a world where weights change the value
                    path = ("table", world, n, policy, "gap_closed", "median")
                    yield f"{world}, {int(n):,} per window, {policy}: gap closed (median)", path


def _serving(doc: dict) -> Iterator[Row]:
    yield "in-process model call, 100 candidates (ms)", ("in_process_ms",)
    for graph in doc["http"]:
        for c in doc["http"][graph]:
            for key in ("p50_ms", "p99_ms", "rps"):
                yield f"{graph} graph, concurrency {c}: {key.replace('_', ' ')}", ("http", graph, c, key)
    target = doc["target_concurrency_8"]
    for key in target:
        if not isinstance(target[key], dict):
            yield f"target at concurrency 8: {key.replace('_', ' ')}", ("target_concurrency_8", key)
    for graph in target.get("cpu_ms_per_request", {}):
        yield f"{graph}: CPU ms per request, all processes", ("target_concurrency_8", "cpu_ms_per_request", graph)


def _autoscale(doc: dict) -> Iterator[Row]:
    yield "offered rate during the step (requests/s)", ("setting", "rate")
    for kind in doc.get("knee", {}):
        yield f"one replica, {kind}: knee (requests in flight)", ("knee", kind, "knee_concurrency")
        yield f"one replica, {kind}: requests/s at the knee", ("knee", kind, "knee_rps")
    for key in ("min_replicas", "max_replicas", "scale_up_s", "scale_down_s"):
        for d in doc[key]:
            yield f"{d}: {key.replace('_', ' ')}", (key, d)
    for key in ("failed_share", "p99_ms_idle", "p99_ms_during"):
        yield key.replace("_", " "), (key,)
    for key in doc["met"]:
        yield f"target met: {key.replace('_', ' ')}", ("met", key)


def _headline(doc: dict) -> Iterator[Row]:
    for key in doc.get("headline", {}):
        yield key, ("headline", key)


SECTIONS: dict[str, tuple[str, Callable[[dict], Iterator[Row]]]] = {
    "data": ("Data: synthetic generator throughput and memory", _data),
    "model": ("Model core: forward+backward throughput (single process)", _model),
    "movielens": ("MovieLens-100K click/like: LLM text against ID-only (Ray Train)", _per_task_runs),
    "training": ("Training throughput on Ray Train (synthetic e-commerce)", _training),
    "llm": ("Text backbones on MovieLens-100K: ID only, MiniLM, SmolLM2", _per_task_runs),
    "serving": ("Serving latency through HTTP (Ray Serve), against an echo floor and an in-process call", _serving),
    "control": ("Fusion-weight control in semi-synthetic worlds (gap closed, safety, honest statistics)", _control),
    "autoscale": ("Autoscaled serving: a load step and the replicas following it", _autoscale),
}

# What the figures mean, under their section's heading: findings that outlive one run, so no figure
# is typed here (the table below each note holds them).
NOTES: dict[str, str] = {
    "control": (
        "G is the share of the static weights' gap to the oracle that a policy closes over the second half after "
        "its world's shift (median over seeds; 1 = the oracle, 0 = static, negative = worse than static). The "
        "adaptive policy (`calibrated`) serves a permanent 5 % holdout and promotes only through always-valid "
        "tests (e-LOND over mSPRT e-values), so where the traffic cannot confirm a lift it mostly stays put: "
        "with click-through near 3 % and purchases near 0.4 % per impression, lifts of about 1 % of the value "
        "take tens of windows to confirm at 1M impressions per window and about ten times as many at 100k. "
        "`proportional` and `target` close gaps in some worlds by accident and break the guardrail in most "
        "(`experiment_violations`, `guardrail_violations` in the JSON). Worlds, metrics and the policy: "
        "`mtrec/fusion/worlds.py`, `bench/control_bench.py`, `mtrec/fusion/calibrated.py`."
    ),
    "autoscale": (
        "Open-loop traffic, idle -> step -> idle, with the autoscaling defaults of `mtrec serve` (README, "
        "Autoscaling) on a local Ray of 8 logical CPUs. On a 2-core host one Embedder replica's knee is already "
        "the host's capacity for cold texts, so a step past it overloads the host, not just the replica: added "
        "replicas bring processes, not cores; a backlog of tens of seconds builds, TaskHeads sees its load only as "
        "the backlog drains (after the step), and the Embedder cannot come down while it drains. The p99 and "
        "scale-down targets need a host with more cores than replicas; `tests/integration/test_serve.py` "
        "shows a replica added under load and removed after it. The replica timeline and the requests in "
        "5-second bins are in the JSON (`timeline`, `requests_per_5s`)."
    ),
    "serving": (
        "`--heads-in-ingress` saves a hop per request; with fewer cores than concurrent requests the CPU time "
        "per request (the `cpu_ms_per_request` rows) sets the latency, so the bound (the echo floor plus twice "
        "the in-process model call, `bound_ms`) needs more cores than the bench host has."
    ),
    "quality": (
        "A sentence encoder's last layer keeps an item's gist and drops lexical detail: on the synthetic "
        "catalogue a linear read-out of the star rating from MiniLM's last layer has R² about 0.72, from the "
        "layers below 0.97-0.99 (`tests/unit/test_encoders_real.py`). With `encoder.layers=[-1,-2,-3]` and no "
        "id embeddings (this benchmark's model) the gap to the oracle AUC falls below 0.01 at 1M interactions. "
        "The wider vector needs data: on 60k-100k rows it learns more slowly than the last layer alone, so the "
        "`synthetic-ecommerce` preset (the demo's 100k rows) keeps `encoder.layers=[-1]`."
    ),
}

# The README's short table: (benchmark, figure, path); rows whose file or path is missing are left out.
HEADLINES: list[tuple[str, str, Path_]] = [
    ("data", "synthetic generator at 10M rows: rows/s", ("results", 1, "rows_per_s")),
    ("data", "synthetic generator at 10M rows: peak RSS (MB)", ("results", 1, "peak_rss_mb")),
    (
        "model",
        "MMoE forward+backward, frozen MiniLM vectors: samples/s",
        ("results", "mmoe", "frozen_minilm_384d", "samples_per_s"),
    ),
    ("movielens", "MovieLens-100K click AUC, LLM-text MMoE", ("runs", "llm_text_mmoe", "click", "auc")),
    ("movielens", "MovieLens-100K click AUC, best ID-only (PLE)", ("runs", "id_only_ple", "click", "auc")),
    ("movielens", "MovieLens-100K cold-item click AUC, LLM-text MMoE", ("runs", "llm_text_mmoe", "click", "cold_auc")),
    (
        "movielens",
        "MovieLens-100K cold-item click AUC, best ID-only (PLE)",
        ("runs", "id_only_ple", "click", "cold_auc"),
    ),
    ("training", "Ray Train, frozen MiniLM vs ID-only samples/s", ("frozen_vs_id_only_1w",)),
    ("training", "Ray Train 2-worker scaling efficiency, frozen MiniLM", ("scaling_efficiency_frozen",)),
    (
        "training",
        "Ray Train 2-worker scaling efficiency, frozen MiniLM, batch 1024 per worker",
        ("scaling_efficiency_frozen_b1024",),
    ),
    ("quality", "e-commerce: largest gap to the oracle AUC over tasks", ("runs", -1, "max_gap")),
    ("serving", "HTTP p50 at concurrency 8, full graph (ms)", ("http", "full", "8", "p50_ms")),
    ("serving", "HTTP p50 at concurrency 8, echo floor (ms)", ("http", "echo", "8", "p50_ms")),
    ("serving", "in-process model call, 100 candidates (ms)", ("in_process_ms",)),
    ("control", "adaptive control: gap closed at 1M impressions/window (worst world)", ("summary", "gap_closed_1m")),
    (
        "control",
        "adaptive control: gap closed at 100k impressions/window (worst world)",
        ("summary", "gap_closed_100k"),
    ),
    ("control", "adaptive control: worst loss against static weights", ("summary", "worst_loss_vs_static")),
    ("control", "adaptive control: share of promotions with no true lift", ("summary", "false_promotion_share")),
]
README = OUT.parent / "README.md"
README_START, README_END = "<!-- bench:start -->", "<!-- bench:end -->"


def readme_block(results: Path = RESULTS) -> str:
    """The table between the README's bench markers."""
    lines = [README_START, "| figure | value | source |", "| --- | ---: | --- |"]
    machines = set()
    for name, label, path in HEADLINES:
        f = results / f"{name}.json"
        if not f.is_file():
            continue
        doc = json.loads(f.read_text())
        try:
            value = lookup(doc, path)
        except KeyError:
            continue
        m = doc.get("machine", {})
        machines.add(
            f"{m.get('cpus', '?')} CPUs, {m.get('mem_gib', '?')} GiB, {'GPU ' + m['cuda'] if m.get('cuda') else 'no GPU'}"
        )
        lines.append(f"| {label} | {fmt(value)} | `{name}.json` `{show(path)}` |")
    lines += [
        "",
        f"Measured on: {'; '.join(sorted(machines))}. Every figure: [BENCHMARKS.md](BENCHMARKS.md).",
        README_END,
    ]
    return "\n".join(lines)


def section(name: str, doc: dict) -> list[str]:
    title, rows = SECTIONS.get(name, (f"{name}", _headline))
    m = doc.get("machine", {})
    where = f"{m.get('cpus', '?')} CPUs, {m.get('mem_gib', '?')} GiB, torch {m.get('torch', '?')}"
    where += f", ray {m['ray']}" if "ray" in m else ""
    where += f", GPU {m['cuda']}" if m.get("cuda") else ", no GPU"
    lines = [f"## {title}", "", f"`bench/results/{name}.json`, {doc.get('date', '?')}; {where}.", ""]
    lines += [NOTES[name], ""] if name in NOTES else []
    lines += ["| figure | value | JSON path |", "| --- | ---: | --- |"]
    for label, path in rows(doc):
        lines.append(f"| {label} | {fmt(lookup(doc, path))} | `{show(path)}` |")
    plots = sorted(p.name for p in RESULTS.glob(f"{name}*.png"))
    lines += [""] + [f"![{p}](bench/results/{p})" for p in plots] + ([""] if plots else [])
    return lines


def render(results: Path = RESULTS) -> str:
    lines = [
        "# Benchmarks",
        "",
        "Generated by `python -m bench.report` from `bench/results/*.json` (do not edit by hand);",
        "`python -m bench` re-runs the benchmarks. Each row gives the JSON path its value is read from.",
        "",
    ]
    order = [*SECTIONS, *sorted(p.stem for p in results.glob("*.json") if p.stem not in SECTIONS)]
    for name in order:
        path = results / f"{name}.json"
        if path.is_file():
            lines += section(name, json.loads(path.read_text()))
    return "\n".join(lines).rstrip() + "\n"


def readme_with_block(text: str) -> str:
    """``text`` (the README) with its bench block regenerated; KeyError when the markers are missing."""
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        raise KeyError(f"{README}: no {README_START} ... {README_END} block")
    return text[:start] + readme_block() + text[end + len(README_END) :]


def write(out: Path = OUT) -> Path:
    atomic_write_text(README, readme_with_block(README.read_text()))
    return atomic_write_text(out, render())


if __name__ == "__main__":
    print(f"wrote {write()}", file=sys.stderr)

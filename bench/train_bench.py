"""Training benchmarks on a real local Ray (``python -m bench.train_bench [movielens] [throughput]``).

``movielens``  MovieLens-100K click/like, time split: the LLM-text model (frozen MiniLM item vectors,
               MMoE) against ID-only shared-bottom, MMoE and PLE trained by the same code; per-task test
               AUC and cold-item AUC → ``bench/results/movielens.json``.
``throughput`` training samples/s on the synthetic e-commerce data with 1 and 2 workers, frozen and
               finetuned MiniLM, and the ID-only MMoE as the baseline measured in the same run, at the
               preset's batch of 256 and at 1024 per worker; the frozen/ID-only ratio, the 2-worker
               scaling efficiency and each run's share of time waiting for input →
               ``bench/results/training.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import save_results

SHARED_DATA = Path(os.environ.get("MTREC_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))

MOVIELENS_RUNS = {
    "llm_text_mmoe": ["encoder.mode=frozen", "model.arch=mmoe"],
    "id_only_shared_bottom": ["encoder.mode=none", "model.arch=shared_bottom"],
    "id_only_mmoe": ["encoder.mode=none", "model.arch=mmoe"],
    "id_only_ple": ["encoder.mode=none", "model.arch=ple"],
}

ID_ONLY = ["encoder.mode=none", "model.use_item_ids=true", "model.use_user_ids=true"]
BIG = ["train.batch_size=1024"]  # per worker; the preset's 256 pays a fixed per-step cost 4x as often
THROUGHPUT_RUNS = {
    # name: (workers, overrides)
    "id_only_mmoe_1w": (1, ID_ONLY),
    "frozen_minilm_1w": (1, ["encoder.mode=frozen"]),
    "frozen_minilm_2w": (2, ["encoder.mode=frozen"]),
    "id_only_mmoe_2w": (2, ID_ONLY),
    "id_only_mmoe_1w_b1024": (1, [*ID_ONLY, *BIG]),
    "frozen_minilm_1w_b1024": (1, ["encoder.mode=frozen", *BIG]),
    "frozen_minilm_2w_b1024": (2, ["encoder.mode=frozen", *BIG]),
    "id_only_mmoe_2w_b1024": (2, [*ID_ONLY, *BIG]),
    "finetune_minilm_1w": (1, ["encoder.mode=finetune", "encoder.finetune_layers=2"]),
    "finetune_minilm_2w": (2, ["encoder.mode=finetune", "encoder.finetune_layers=2"]),
}


def _train(preset: str, overrides: list[str], data: Path, out: Path) -> dict[str, Any]:
    from mtrec.config import load_preset
    from mtrec_train.trainer import run_training

    cfg = load_preset(preset).override(overrides)
    return run_training(cfg, data, out)


def bench_movielens(work: Path) -> dict[str, Any]:
    from mtrec.data.movielens import convert

    src = SHARED_DATA / "ml-100k"
    if not src.exists():
        raise SystemExit(f"MovieLens-100K not found at {src} (set MTREC_SHARED_DATA)")
    data = convert(src, work / "ml-100k")
    rows = {}
    for name, overrides in MOVIELENS_RUNS.items():
        m = _train("movielens", overrides, data, work / name)
        rows[name] = {
            task: {k: m["test"][task].get(k) for k in ("auc", "cold_auc", "logloss")} for task in m["test"]
        } | {"samples_per_s": m["train"]["samples_per_s"]}
        print(f"[bench] movielens {name}: {rows[name]}", flush=True)
    llm = rows["llm_text_mmoe"]
    verdict = {
        f"llm_beats_id_only_{task}_{metric}": all(
            llm[task][metric] > r[task][metric] for n, r in rows.items() if n != "llm_text_mmoe"
        )
        for task in ("click", "like")
        for metric in ("auc", "cold_auc")
    }
    save_results("movielens", {"dataset": "ml-100k click/like, time split 80/10/10", "runs": rows, **verdict})
    return rows


def bench_throughput(work: Path, interactions: int, finetune_interactions: int) -> dict[str, Any]:
    """samples/s is a rate: the finetune runs (about 100 samples/s on 2 CPU cores) use a smaller
    dataset from the same generator so that they finish in minutes."""
    from mtrec.data.synthetic import generate

    data = generate("ecommerce", work / "syn", num_users=5000, num_items=2000, num_interactions=interactions, seed=0)
    small = generate(
        "ecommerce", work / "syn-small", num_users=500, num_items=300, num_interactions=finetune_interactions
    )
    # warm-up, not timed: the first training run of a fresh cluster is slower (workers, Ray Data and the
    # dashboard still starting), which would handicap whichever run comes first
    _train("synthetic-ecommerce", ["train.epochs=1", *ID_ONLY], data, work / "warm-up")
    rows = {}
    for name, (workers, overrides) in THROUGHPUT_RUNS.items():
        finetune = "encoder.mode=finetune" in overrides
        m = _train(
            "synthetic-ecommerce",
            [f"train.num_workers={workers}", f"train.epochs={2 if finetune else 3}", *overrides],
            small if finetune else data,
            work / name,
        )
        rows[name] = {"workers": workers, **{k: m["train"][k] for k in ("samples_per_s", "wall_s", "input_wait_frac")}}
        print(f"[bench] throughput {name}: {rows[name]['samples_per_s']:,.0f} samples/s", flush=True)
    sps = {k: v["samples_per_s"] for k, v in rows.items()}
    figures = {
        "frozen_vs_id_only_1w": sps["frozen_minilm_1w"] / sps["id_only_mmoe_1w"],
        "scaling_efficiency_frozen": sps["frozen_minilm_2w"] / (2 * sps["frozen_minilm_1w"]),
        "scaling_efficiency_id_only": sps["id_only_mmoe_2w"] / (2 * sps["id_only_mmoe_1w"]),
        "scaling_efficiency_finetune": sps["finetune_minilm_2w"] / (2 * sps["finetune_minilm_1w"]),
        "scaling_efficiency_frozen_b1024": sps["frozen_minilm_2w_b1024"] / (2 * sps["frozen_minilm_1w_b1024"]),
        "scaling_efficiency_id_only_b1024": sps["id_only_mmoe_2w_b1024"] / (2 * sps["id_only_mmoe_1w_b1024"]),
    }
    print(f"[bench] {figures}", flush=True)
    save_results(
        "training",
        {"interactions": interactions, "finetune_interactions": finetune_interactions, "runs": rows, **figures},
    )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.train_bench", description=__doc__.split("\n")[0])
    p.add_argument("which", nargs="*", default=["movielens", "throughput"], choices=["movielens", "throughput"])
    p.add_argument("--interactions", type=int, default=100_000)
    p.add_argument("--finetune-interactions", type=int, default=5_000)
    args = p.parse_args(argv)
    from mtrec_cluster.ray_env import local_ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a loopback-only local Ray for the benchmark
    with local_ray(num_cpus=4), tempfile.TemporaryDirectory() as tmp:
        if "movielens" in args.which:
            bench_movielens(Path(tmp))
        if "throughput" in args.which:
            bench_throughput(Path(tmp), args.interactions, args.finetune_interactions)
    return 0


if __name__ == "__main__":
    sys.exit(main())

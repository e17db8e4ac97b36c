"""Multi-task model throughput: forward + backward samples/s (``python -m bench.model_bench``).

For each architecture (shared-bottom, MMoE, PLE; DIN history of 20 items) on batches of the synthetic
e-commerce data: the frozen path with cached MiniLM vectors (384-d), the frozen path with cached
vectors of a tiny random BERT (32-d), and the finetune path (MiniLM, top 2 layers trained, encoding
the batch's unique items on every step). Each figure is the median over ``--repeats`` timings of
``--batches`` batches. The frozen path reads a fixed vector table, so its cost should not depend on
the language model's size: the 384-d / 32-d samples/s ratio should be close to 1.
Saves ``bench/results/model.json``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import median_time, save_results


def _tiny_encoder(tokenizer: Any):
    """A 2-layer, 32-d random BERT over MiniLM's tokenizer: a stand-in for a much smaller model."""
    from transformers import BertConfig, BertModel

    from mtrec.encoders import TextEncoder

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    )
    return TextEncoder(BertModel(config).eval(), tokenizer, max_length=64, model_id="tiny-bert@random")


def _samples_per_s(model: torch.nn.Module, batches: list[dict], repeats: int) -> dict[str, Any]:
    from mtrec.models import task_losses

    model.train()

    def run() -> None:
        for b in batches:
            model.zero_grad(set_to_none=True)
            losses, _ = task_losses(model(b), b["labels"], model.tasks, model.loss_scales)
            losses.sum().backward()

    seconds, times = median_time(run, repeats=repeats)
    n = sum(len(b["user"]) for b in batches)
    return {"samples_per_s": n / seconds, "runs_s": times, "samples": n}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=8, help="batches per timing (frozen paths)")
    parser.add_argument("--finetune-batches", type=int, default=2, help="batches per timing (finetune path)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from mtrec.config import Config, EncoderConfig
    from mtrec.data.synthetic import generate
    from mtrec.encoders import TextEncoder, encode_cached
    from mtrec.engine import batches
    from mtrec.features import collate, prepare_examples
    from mtrec.models import ARCHITECTURES, build_model

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = generate("ecommerce", work / "data", num_users=2000, num_items=1000, num_interactions=20_000, seed=0)
        base = Config().override(["model.id_buckets=10007"])
        examples = prepare_examples(data, base, work / "examples")
        meta = examples.meta
        rng = np.random.default_rng(0)
        all_batches = [collate(b) for b in batches(examples.arrays("train"), args.batch_size, rng)]
        minilm = TextEncoder.from_config(EncoderConfig())
        tiny = _tiny_encoder(minilm.tokenizer)
        tables = {}
        for name, enc in (("minilm", minilm), ("tiny", tiny)):
            vectors = encode_cached(enc, meta.item_texts, work / "cache")
            tables[name] = torch.as_tensor(np.concatenate([np.zeros((1, enc.dim), np.float32), vectors]))

        results: dict[str, Any] = {}
        for arch in ARCHITECTURES:
            cfg = base.override([f"model.arch={arch}"])
            row: dict[str, Any] = {}
            for name, table in tables.items():
                torch.manual_seed(0)
                model = build_model(cfg, meta, table)
                row[f"frozen_{name}_{table.shape[1]}d"] = _samples_per_s(
                    model, all_batches[: args.batches], args.repeats
                )
            row["frozen_ratio_minilm_over_tiny"] = (
                row["frozen_minilm_384d"]["samples_per_s"] / row["frozen_tiny_32d"]["samples_per_s"]
            )
            ft = cfg.override(["encoder.mode=finetune", "encoder.finetune_layers=2"])
            encoder = TextEncoder.from_config(ft.encoder)
            torch.manual_seed(0)
            model = build_model(ft, meta, None, encoder)
            row["finetune_minilm_top2"] = _samples_per_s(
                model, all_batches[: args.finetune_batches], max(2, args.repeats // 2)
            )
            results[arch] = row
            print(
                f"{arch:14s} frozen MiniLM {row['frozen_minilm_384d']['samples_per_s']:8,.0f}/s | "
                f"frozen tiny {row['frozen_tiny_32d']['samples_per_s']:8,.0f}/s | "
                f"ratio {row['frozen_ratio_minilm_over_tiny']:.2f} | "
                f"finetune MiniLM top-2 {row['finetune_minilm_top2']['samples_per_s']:6,.0f}/s",
                flush=True,
            )
    path = save_results(
        "model",
        {
            "what": "forward+backward samples/s of the multi-task model, median of repeated timings",
            "settings": vars(args) | {"history": base.model.history, "max_history": base.data.max_history},
            "results": results,
        },
    )
    print(f"saved {path}")


if __name__ == "__main__":
    main()

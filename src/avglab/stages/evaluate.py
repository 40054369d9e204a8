"""Evaluation stage: greedy answers, accuracy by type, the benchmark's metric, tokens, routing, latency.

Two passes per selector, each with one job. Accuracy: every test batch is generated at
``stage.eval_batch_size`` with left padding (fast). Latency: the first ``stage.latency_samples``
samples are generated again one at a time (batch size 1, the paper's setting) after one untimed
warm-up pass, and timed per phase; their predictions must equal the batched ones
(``batch1_agreement`` in metrics.json).

On several ranks each rank answers its own test shards; at the end every rank's records are gathered,
so every figure and ``predictions.jsonl`` cover each sample exactly once, and rank 0 alone writes them.
Latency is timed on rank 0 only (its first ``stage.latency_samples`` samples): the other ranks share
the machine and would time each other's contention.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import torch

from avglab.core.generation import greedy_generate, synchronize
from avglab.core.model import AvgCore
from avglab.data.ranks import gather_objects
from avglab.eval.metrics import exact_match
from avglab.eval.scoring import benchmark_score, check_metric
from avglab.eval.summary import LATENCY_NOTE, TOKEN_NOTE, summarize
from avglab.reduce.build import build_reductions
from avglab.reduce.report import add_cost_means, cost_fields, tokens_per_layer
from avglab.stages.eval_output import write_outputs

log = logging.getLogger(__name__)


def sample_of(batch: dict, i: int) -> dict:
    """Row ``i`` of a collate batch as a batch of one, its text trimmed to its own (right-padded) length.

    Args:
        batch: the collate contract (tensors with a leading batch axis, lists for ids/types/answers).
        i: row index.
    """
    out = {k: v[i : i + 1] if isinstance(v, torch.Tensor) else [v[i]] for k, v in batch.items()}
    length = int(out["attention_mask"].sum())
    for key in ("input_ids", "attention_mask", "labels", "instruction_mask"):
        if key in out:
            out[key] = out[key][:, :length]
    prompt = int(out["prompt_attention_mask"].sum())
    out["prompt_input_ids"] = out["prompt_input_ids"][:, :prompt]
    out["prompt_attention_mask"] = out["prompt_attention_mask"][:, :prompt]
    return out


class EvalStage(L.LightningModule):
    """Runs the configured selector (and optionally every fixed level) over the test split.

    Args:
        core: the shared core with its selector.
        tokenizer: decodes the generated ids.
        out_dir: where metrics.json, predictions.jsonl and the routing figure go.
        selector_name: label of the configured selector in tables.
        compare_fixed: also evaluate each fixed granularity on the same samples.
        max_new_tokens: generation budget per answer.
        fingerprint: config hash and package versions recorded with the metrics.
        latency_samples: samples per selector timed alone at batch size 1 (0: no latency).
        metric: the benchmark's metric (``avglab.eval.scoring.METRICS``), from ``data.metric``.
        eval_batch_size: batch size of the accuracy pass (recorded with the results).
        compare_reduce: training-free reductions (``avglab.reduce``: names or settings) also evaluated,
            each after the selector, on the same samples.
    """

    def __init__(
        self,
        core: AvgCore,
        tokenizer,
        out_dir: Path,
        selector_name: str,
        compare_fixed: bool = True,
        max_new_tokens: int = 8,
        fingerprint: dict | None = None,
        latency_samples: int = 32,
        metric: str = "exact_match",
        eval_batch_size: int = 1,
        compare_reduce=(),
    ):
        super().__init__()
        if latency_samples < 0:
            raise ValueError(f"stage.latency_samples={latency_samples}: must be >= 0")
        self.latency_samples = latency_samples
        self.metric = check_metric(metric)
        self.eval_batch_size = eval_batch_size
        self.core = core
        self.tokenizer = tokenizer
        self.out_dir = Path(out_dir)
        self.selector_name = selector_name
        levels = list(range(core.scaler.num_levels)) if compare_fixed else []
        self.modes: list[tuple[str, int | None]] = [(selector_name, None)] + [
            (f"fixed@{g}", i) for i, g in zip(levels, core.scaler.granularities, strict=False)
        ]
        depth = core.config.text_config.num_hidden_layers
        built = build_reductions(compare_reduce, depth)
        self.reductions = {f"{selector_name}+{label}": r for label, r in built.items() if r is not None}
        self.modes += [(name, None) for name in self.reductions]
        self.max_new_tokens = max_new_tokens
        self.fingerprint = fingerprint or {}
        self.records: dict[str, list[dict]] = {name: [] for name, _ in self.modes}
        self.timed_count: dict[str, int] = {name: 0 for name, _ in self.modes}
        self.results: dict[str, dict] = {}
        self.metrics: dict = {}  # metrics.json's content, set on every rank at the end of the test epoch

    @classmethod
    def from_config(cls, core: AvgCore, tokenizer, cfg, out_dir: Path, fingerprint: dict) -> EvalStage:
        """The stage from the composed config (``stage.*``, ``data.metric``, ``router.kind``)."""
        stage = cfg.stage
        batch_size = stage.get("eval_batch_size") or cfg.data.eval_batch_size
        if batch_size < 1:
            raise ValueError(f"stage.eval_batch_size={batch_size}: must be >= 1")
        return cls(
            core,
            tokenizer,
            out_dir,
            selector_name=cfg.router.kind,
            compare_fixed=stage.compare_fixed,
            max_new_tokens=stage.max_new_tokens,
            fingerprint=fingerprint,
            latency_samples=stage.get("latency_samples", 32),
            metric=cfg.data.get("metric") or "exact_match",
            eval_batch_size=batch_size,
            compare_reduce=stage.get("compare_reduce") or (),
        )

    def timed(self, fn, *args):
        """Runs fn and returns (result, milliseconds), synchronising GPU work."""
        synchronize(self.device)
        start = time.perf_counter()
        out = fn(*args)
        synchronize(self.device)
        return out, (time.perf_counter() - start) * 1e3

    @torch.no_grad()
    def answer(self, batch: dict, level: int | None) -> list[dict]:
        """Generates answers for one batch with the selector (level None) or a fixed level."""
        core = self.core
        (tiles, owner), t_vision = self.timed(
            core.project, batch["pixel_values"], batch["image_sizes"], batch["has_image"]
        )

        def select_and_pack():
            encoded = core.pyramid(tiles, owner, batch["has_image"])
            levels, _ = core.select(encoded, batch) if level is None else (None, None)
            if levels is None:
                levels = torch.full((len(batch["input_ids"]),), level)
            return levels, core.pack(encoded, batch["image_sizes"], levels)

        (levels, visual), t_select = self.timed(select_and_pack)
        prompt = core.splice(
            batch["prompt_input_ids"], batch["prompt_attention_mask"], visual, padding_side="left"
        )
        generated = self.generate(prompt, batch, level)
        equivalent = self.equivalent_tokens(generated, visual)
        full = core.token_counts(batch["image_sizes"].cpu(), batch["has_image"].cpu())[:, -1]
        per_layer = tokens_per_layer(generated, visual, core.config.text_config.num_hidden_layers)
        has_image = batch["has_image"].cpu()
        prompt_mask = batch["prompt_attention_mask"]
        costs = cost_fields(core.config.text_config, prompt_mask, has_image, per_layer, full)
        size = len(batch["input_ids"])
        latency = {
            "vision_projector": t_vision / size,
            "selection": t_select / size,
            "prefill": generated.prefill_ms / size,
            "decode": generated.decode_ms / size,
        }
        latency["total"] = sum(latency.values())
        records = []
        timed = size == 1  # a batched pass says nothing about per-sample latency
        for i in range(size):
            ids = generated.tokens[i].tolist()
            ids = ids[: ids.index(self.tokenizer.eos_token_id)] if self.tokenizer.eos_token_id in ids else ids
            prediction = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
            has_image = bool(batch["has_image"][i])
            # FocusLLaVA's samplers choose no level (FOCUS_LEVEL = -1), so no granularity either
            chosen = int(levels[i]) >= 0 and has_image
            granularity = core.scaler.granularities[int(levels[i])] if chosen else 0
            records.append(
                {
                    "id": batch["ids"][i],
                    "question_type": batch["question_type"][i],
                    "prediction": prediction,
                    "answers": batch["answers"][i],
                    "correct": exact_match(prediction, batch["answers"][i]),
                    "has_image": has_image,  # text-only: answered, never routed (level -1, 0 tokens)
                    "level": int(levels[i]) if has_image else -1,
                    "granularity": granularity,
                    "visual_tokens": 0 if visual[i] is None else len(visual[i]),
                    "visual_tokens_full": int(full[i]),
                    "visual_tokens_equivalent": float(equivalent[i]),
                    "latency_ms": dict(latency) if timed else None,
                    **costs[i],
                }
            )
        return records

    # --- in-LLM pruning (FocusLLaVA's text sampler): its decoding loop and layer-weighted tokens ---
    def generate(self, prompt, batch: dict, level: int | None = None):
        """Greedy decoding; a core with its own loop (``FocusCore.generate_greedy``) runs that one.

        The ``fixed@g`` rows (``level`` given) decode with the plain loop on every core, so on a
        FocusLLaVA core they are the fixed-level baselines, without the text sampler's in-LLM pruning.
        """
        own = getattr(self.core, "generate_greedy", None)
        if own is not None and level is None:
            return own(prompt, batch, self.max_new_tokens, self.tokenizer.eos_token_id)
        return greedy_generate(self.core, prompt, self.max_new_tokens, self.tokenizer.eos_token_id)

    @staticmethod
    def equivalent_tokens(generated, visual: list) -> list[float]:
        """Per sample m - n + i*n/L (METHOD 2.2); without in-LLM pruning, the first-layer count m."""
        given = getattr(generated, "equivalent_tokens", None)
        if given is not None:
            return [float(x) for x in given]
        return [0.0 if v is None else float(len(v)) for v in visual]

    @staticmethod
    def add_equivalent_means(results: dict[str, dict], records: dict[str, list[dict]]) -> None:
        """``visual_tokens_equivalent_mean`` next to ``visual_tokens_mean`` for every mode."""
        for name, recs in records.items():
            values = [r["visual_tokens_equivalent"] for r in recs]
            results[name]["visual_tokens_equivalent_mean"] = sum(values) / len(values)

    # --- end of the in-LLM pruning addition ---

    @staticmethod
    def add_text_only_counts(results: dict[str, dict], records: dict[str, list[dict]]) -> None:
        """``text_only_samples`` for every mode: answered and scored, but in no routing histogram.

        Text-only samples carry no routing preference (pitfall 7); ``summarize`` counts them in
        ``samples`` and the accuracies, and leaves them (level -1) out of the granularity histograms.
        """
        for name, recs in records.items():
            results[name]["text_only_samples"] = sum(not r["has_image"] for r in recs)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        for name, level in self.modes:
            with self.reduction_of(name):
                records = self.answer(batch, level)
                self.time_at_batch_size_one(name, level, batch, records)
            self.records[name] += records

    @contextmanager
    def reduction_of(self, name: str):
        """The core runs mode ``name``'s reduction (a ``compare_reduce`` row), else the configured one."""
        configured = self.core.reduction
        self.core.reduction = self.reductions.get(name, configured)
        try:
            yield
        finally:
            self.core.reduction = configured

    def time_at_batch_size_one(self, name: str, level: int | None, batch: dict, records: list[dict]) -> None:
        """Re-generates the batch's first untimed samples alone, timed, until ``latency_samples`` are done.

        The first timed sample of each selector is preceded by one untimed pass of the same sample
        (warm-up: lazy allocations and kernel selection would otherwise land in its numbers). Only
        rank 0 times: ``latency_samples`` counts its samples.
        """
        batched = len(records) > 1
        for i, record in enumerate(records):
            if self.global_rank != 0 or self.timed_count[name] >= self.latency_samples:
                record["latency_ms"] = None
                continue
            if not batched and self.timed_count[name] > 0:
                record["prediction_batch1"] = record["prediction"]  # already alone, and warm: keep its times
            else:
                # at batch size 1 the first pass was the warm-up; a batched pass needs its own
                if batched and self.timed_count[name] == 0:
                    self.answer(sample_of(batch, i), level)
                alone = self.answer(sample_of(batch, i) if batched else batch, level)[0]
                record["latency_ms"] = alone["latency_ms"]
                record["prediction_batch1"] = alone["prediction"]
            self.timed_count[name] += 1

    def gathered(self) -> tuple[dict[str, list[dict]], dict[str, dict[str, int]]]:
        """Every rank's records per selector, rank 0's first, and the data's counts summed over ranks.

        Test shards go to ranks without padding or repeats (``split_by_rank``), so each sample is
        answered by exactly one rank and the concatenation holds every sample once.

        Returns:
            (records per selector, ``{"skipped_samples", "unknown_tokens"}`` when a datamodule counted them).
        """
        datamodule = self._trainer.datamodule if self._trainer is not None else None
        counts = {
            key: dict(getattr(datamodule, attr))
            for key, attr in (("skipped_samples", "skipped"), ("unknown_tokens", "unknown"))
            if hasattr(datamodule, attr)
        }
        parts = gather_objects({"records": self.records, "counts": counts})
        records = {name: [r for part in parts for r in part["records"][name]] for name, _ in self.modes}
        totals: dict[str, dict[str, int]] = {key: {} for key in counts}
        for part in parts:
            for key, values in part["counts"].items():
                for reason, n in values.items():
                    totals[key][reason] = totals[key].get(reason, 0) + n
        return records, totals

    def on_test_epoch_end(self) -> None:
        records, counts = self.gathered()
        granularities = self.core.scaler.granularities
        self.results = {name: summarize(recs, granularities) for name, recs in records.items()}
        self.add_equivalent_means(self.results, records)
        self.add_text_only_counts(self.results, records)
        add_cost_means(self.results, records)
        for name, recs in records.items():
            self.results[name]["benchmark"] = benchmark_score(self.metric, recs)
        main = dict(self.results[self.selector_name])
        main.update(
            selector=self.selector_name,
            token_counting=TOKEN_NOTE,
            latency_note=LATENCY_NOTE,
            latency_protocol={
                "batch_size": 1,
                "samples_per_selector": self.latency_samples,
                "warmup_passes": 1,
                "statistic": "median",
                "timed_on": "rank 0",
                "accuracy_batch_size": self.eval_batch_size,
                "accuracy_padding": "left",
                "max_new_tokens": self.max_new_tokens,
            },
            granularities=granularities,
            fixed_levels={
                k: v for k, v in self.results.items() if k != self.selector_name and k not in self.reductions
            },
            reductions={n: {**self.results[n], "settings": r.settings()} for n, r in self.reductions.items()},
            reduction=self.core.reduction.settings() if self.core.reduction is not None else {"name": "none"},
            fingerprint=self.fingerprint,
            ranks=self._trainer.world_size if self._trainer is not None else 1,
            **counts,
        )
        self.metrics = main  # every rank: the same figures
        if self.global_rank == 0:
            write_outputs(self, main, records[self.selector_name])

"""``AvgLabLMM``: an lmms-eval model over an avglab export, answering through avglab's evaluation path.

Usage (``pip install -e '.[lmms]'``, see the README; avglab registers itself through the
``lmms_eval.models`` entry point)::

    python -m lmms_eval --model avglab --batch_size 8 --tasks textvqa_val,mme \
        --model_args pretrained=<export folder>,selector=router,stats_dir=<dir> \
        --log_samples --output_path <dir>

The batch size and the device are lmms-eval's own ``--batch_size`` / ``--device`` (lmms-eval always passes
them to the model); ``batch_size``/``device`` in ``--model_args`` are still accepted and win over them.

Token counts reach lmms-eval's output: ``generate_until`` returns lmms-eval's ``GenerationResult`` with
``TokenCounts(input_tokens, output_tokens)`` (input = the LLM's prompt length, visual tokens included;
output = generated tokens, EOS included), which ``--log_samples`` writes to the samples file
(``token_counts``) and sums in the results file (``efficiency``). Routing (chosen granularity, visual tokens
against the finest level) has no place there: with ``stats_dir=<dir>`` the plugin writes
``<dir>/avglab_requests.jsonl`` (one line per request) and ``<dir>/avglab_summary.json`` (per task).

Only the request interface lmms-eval hands to a "simple" model is used: ``request.args`` is
``(context, gen_kwargs, doc_to_visual, doc_id, task, split)`` for ``generate_until`` and
``(context, continuation or doc_to_target, doc_to_visual, doc_id, task, split)`` for ``loglikelihood``;
documents come from ``self.task_dict[task][split][doc_id]`` (lmms-eval sets ``task_dict``). Without
lmms-eval installed the class still imports (its base and result types fall back to stand-ins), so it can
be tested offline with hand-built requests.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from avglab.data.collate import collate
from avglab.data.processor import SampleProcessor
from avglab.stages.evaluate import EvalStage

try:  # lmms-eval's base class when installed
    from lmms_eval.api.model import lmms as _Base
except ImportError:  # offline use and tests

    class _Base:  # noqa: D101 - stand-in with the helpers lmms-eval's base provides
        is_simple = True

        def __init__(self) -> None:
            self._rank, self._world_size = 0, 1
            self.task_dict: dict = {}

        @classmethod
        def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
            """``key=value,key=value`` -> constructor kwargs (as lmms-eval's ``simple_parse_args_string``)."""
            args = dict(kv.split("=", 1) for kv in arg_string.split(",") if kv)
            args.update({k: v for k, v in (additional_config or {}).items() if v is not None})
            return cls(**args)

        def clean(self) -> None:
            """lmms-eval frees the model after the last request type."""


try:  # lmms-eval >= 0.7: per-request token counts in the samples and results files
    from lmms_eval.api.instance import GenerationResult, TokenCounts
except ImportError:
    try:
        import lmms_eval  # noqa: F401 - an older lmms-eval: it takes plain strings only
    except ImportError:  # not installed: stand-ins with the same fields

        @dataclass
        class TokenCounts:  # noqa: D101 - lmms_eval.api.instance.TokenCounts
            input_tokens: int | None = None
            output_tokens: int | None = None
            reasoning_tokens: int | None = None

        @dataclass
        class GenerationResult:  # noqa: D101 - lmms_eval.api.instance.GenerationResult
            text: str
            token_counts: TokenCounts | None = None

    else:
        GenerationResult = TokenCounts = None


log = logging.getLogger(__name__)
REQUESTS_FILE, SUMMARY_FILE = "avglab_requests.jsonl", "avglab_summary.json"


def parse_selector(selector: str, granularities: list[int]) -> str | int | None:
    """``router`` (the exported router), ``full`` (finest, no router) or a granularity (tokens per tile).

    Returns:
        "router", None (full) or the level index of the fixed granularity.
    """
    if selector in ("router", "full"):
        return "router" if selector == "router" else None
    try:
        return granularities.index(int(selector))
    except ValueError as err:
        raise ValueError(
            f"model_args selector={selector!r}: choose router, full or one of {granularities}"
        ) from err


def parse_batch_size(batch_size: int | str) -> int:
    """lmms-eval's ``--batch_size`` (``N``; ``auto`` / ``auto:N`` are not supported here)."""
    try:
        size = int(batch_size)
    except ValueError as err:
        raise ValueError(f"batch_size={batch_size!r}: avglab takes a number (no auto batch size)") from err
    if size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    return size


def to_device(batch: dict, device: torch.device) -> dict:
    """The collated batch's tensors on the model's device (ids, answers and other lists stay)."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


class _PluginEval(EvalStage):
    """avglab's evaluation stage, keeping the last prompt and generation to count their tokens."""

    def generate(self, prompt, batch: dict, level: int | None = None):  # noqa: D102 - EvalStage.generate
        self.last_prompt, self.last_generated = prompt, super().generate(prompt, batch, level)
        return self.last_generated


class AvgLabLMM(_Base):
    """avglab's core behind lmms-eval's ``generate_until`` / ``loglikelihood`` interface.

    Args:
        pretrained: an export folder (``python -m avglab.tools.export``).
        selector: ``router``, ``full`` or a fixed granularity in tokens per tile (e.g. ``144``).
        batch_size: generation requests per batched (left-padded) pass (lmms-eval's ``--batch_size``).
        max_new_tokens: default generation budget (a request's ``gen_kwargs`` override it).
        template: chat template of the checkpoint (``vicuna_v1``, ``llama_3``).
        device: torch device (lmms-eval's ``--device``); default cuda when available, else cpu.
        dtype: ``auto`` keeps the exported dtype, or e.g. ``bfloat16``.
        stats_dir: if given, per-request routing and token counts go to ``<stats_dir>/avglab_requests.jsonl``
            and a per-task summary to ``<stats_dir>/avglab_summary.json``.
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        selector: str = "router",
        batch_size: int | str = 1,
        max_new_tokens: int | str = 16,
        template: str = "vicuna_v1",
        device: str | None = None,
        dtype: str = "auto",
        stats_dir: str | None = None,
        max_batch_size=None,  # lmms-eval's, for --batch_size auto only
        **unused,
    ) -> None:
        super().__init__()
        from avglab.tools.export import load_pretrained  # late: builds the whole data/model stack

        if unused:
            log.warning("avglab: ignoring model_args %s", sorted(unused))
        batch_size = parse_batch_size(batch_size)  # fail before loading the model
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        tokenizer, image_processor, core = load_pretrained(pretrained, dtype)
        core = core.to(device)
        self.setup(core, tokenizer, image_processor, selector, batch_size, int(max_new_tokens), template,
                   stats_dir)  # fmt: skip

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> AvgLabLMM:
        """``--model_args`` plus lmms-eval's own ``batch_size``/``max_batch_size``/``device``.

        lmms-eval always passes its ``--batch_size`` (default 1) in ``additional_config``; a key given in
        ``--model_args`` too wins instead of being passed twice.
        """
        try:
            from lmms_eval.utils import simple_parse_args_string
        except ImportError:  # the stand-in base: plain key=value strings

            def simple_parse_args_string(text):
                return dict(kv.split("=", 1) for kv in text.split(",") if kv)

        args = simple_parse_args_string(arg_string or "")
        for key, value in (additional_config or {}).items():
            if value is None:
                continue
            if key in args:
                if str(args[key]) != str(value):
                    log.warning("avglab: model_args %s=%s overrides lmms-eval's %s", key, args[key], value)
                continue
            args[key] = value
        return cls(**args)

    @classmethod
    def from_parts(
        cls, core, tokenizer, image_processor, selector="router", batch_size=1, max_new_tokens=16,
        template="vicuna_v1", stats_dir=None,
    ) -> AvgLabLMM:  # fmt: skip
        """The plugin over an in-memory core (tests, notebooks) instead of an export folder."""
        self = cls.__new__(cls)
        _Base.__init__(self)
        self.setup(core, tokenizer, image_processor, selector, parse_batch_size(batch_size), max_new_tokens,
                   template, stats_dir)  # fmt: skip
        return self

    def setup(
        self, core, tokenizer, image_processor, selector, batch_size, max_new_tokens, template, stats_dir=None
    ) -> None:
        """Shared construction: the selector, the sample processor and avglab's evaluation stage."""
        choice = parse_selector(str(selector), core.scaler.granularities)
        if choice == "router" and core.selector is None:
            raise ValueError("model_args selector=router: the export has no router; use full or a level")
        # the level every sample gets (None: the router's choice); the core itself is left as it is
        self.level = None if choice == "router" else core.scaler.num_levels - 1 if choice is None else choice
        self.core, self.tokenizer, self.batch_size_per_gpu = core.eval(), tokenizer, batch_size
        self.device = next(core.parameters()).device
        self.selector_name = str(selector)
        self.processor = SampleProcessor(tokenizer, image_processor, template)
        self.evaluator = _PluginEval(core, tokenizer, Path(tempfile.gettempdir()), str(selector), False,
                                     max_new_tokens)  # fmt: skip
        self.max_new_tokens = max_new_tokens
        self.request_stats: list[dict] = []  # per request: task, doc_id, tokens, granularity
        self.task_dict = getattr(self, "task_dict", None) or {}
        self.stats_dir = Path(stats_dir) if stats_dir else None
        if self.stats_dir is not None:
            self.stats_dir.mkdir(parents=True, exist_ok=True)
            (self.stats_dir / REQUESTS_FILE).write_text("")  # this run's requests only

    # ------------------------------------------------------------------ requests -> avglab batches
    def sample(self, context: str, visuals: list, answer: str | None, doc_id, task) -> dict:
        """One processed sample (the collate contract's per-sample dict) for a request."""
        if len(visuals) > 1:
            raise ValueError(f"{task}/{doc_id}: {len(visuals)} images; avglab takes one image per sample")
        image = visuals[0].convert("RGB") if visuals else None
        human = ("<image>\n" if image is not None else "") + context
        turns = [{"from": "human", "value": human}]
        if answer is not None:
            turns.append({"from": "gpt", "value": answer})
        record = {"id": f"{task}/{doc_id}", "conversations": turns, "answers": [answer or ""]}
        return self.processor(record, image)

    def visuals(self, doc_to_visual, doc_id, task, split) -> list:
        """The request's images (lmms-eval's ``doc_to_visual`` over the task's document)."""
        if doc_to_visual is None:
            return []
        out = doc_to_visual(self.task_dict[task][split][doc_id])
        return [v for v in (out if isinstance(out, list) else [out]) if v is not None]

    def batch(self, samples: list[dict]) -> dict:
        """Collated samples on the model's device."""
        return to_device(collate(samples, self.tokenizer.pad_token_id), self.device)

    # ------------------------------------------------------------------ lmms-eval API
    @torch.no_grad()
    def generate_until(self, requests) -> list:
        """Greedy answers, ``batch_size`` requests per left-padded pass (avglab's evaluation path).

        Returns:
            lmms-eval's ``GenerationResult`` per request (text and token counts), or plain strings for an
            lmms-eval without it.
        """
        answers = []
        eos = self.tokenizer.eos_token_id
        for start in range(0, len(requests), self.batch_size_per_gpu):
            chunk = [r.args for r in requests[start : start + self.batch_size_per_gpu]]
            budget = max(int(a[1].get("max_new_tokens", self.max_new_tokens)) for a in chunk)
            samples = [self.sample(c, self.visuals(v, d, t, s), None, d, t) for c, _, v, d, t, s in chunk]
            self.evaluator.max_new_tokens = budget
            records = self.evaluator.answer(self.batch(samples), self.level)
            prompt_lengths = self.evaluator.last_prompt.attention_mask.sum(1).tolist()
            generated = self.evaluator.last_generated.tokens.tolist()
            for i, ((_, kwargs, _, doc_id, task, _), record) in enumerate(zip(chunk, records, strict=True)):
                text = record["prediction"]
                for stop in kwargs.get("until") or []:
                    text = text.split(stop)[0] if stop else text
                ids = generated[i]
                n_out = ids.index(eos) + 1 if eos in ids else len(ids)
                counts = {"input_tokens": int(prompt_lengths[i]), "output_tokens": n_out}
                full = record["visual_tokens_full"]
                self.record_stats(task, doc_id, record["visual_tokens"], record["granularity"],
                                  "generate_until", visual_tokens_full=full, **counts)  # fmt: skip
                if GenerationResult is not None:
                    text = GenerationResult(text, TokenCounts(**counts))
                answers.append(text)
        self.write_summary()
        return answers

    @torch.no_grad()
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """Summed log-probability of each continuation's tokens (not a mean) and its greedy flag.

        The flag says whether greedy decoding would produce every continuation token; the sample is
        fed at the granularity the selector picks.
        """
        out = []
        for context, target, doc_to_visual, doc_id, task, split in [r.args for r in requests]:
            doc = self.task_dict[task][split][doc_id] if not isinstance(target, str) else None
            continuation = target if isinstance(target, str) else target(doc)
            sample = self.sample(context, self.visuals(doc_to_visual, doc_id, task, split), continuation,
                                 doc_id, task)  # fmt: skip
            score, greedy, tokens, granularity = self.continuation_score(self.batch([sample]), continuation)
            out.append((score, greedy))
            self.record_stats(task, doc_id, tokens, granularity, "loglikelihood")
        self.write_summary()
        return out

    def continuation_score(self, batch: dict, continuation: str) -> tuple[float, bool, int, int]:
        """Sum of log P(continuation tokens), greedy flag, visual tokens and granularity of one sample.

        The template's end-of-turn tokens are not part of the continuation: the answer piece is
        ``answer_prefix + continuation + turn_end``, and its first
        ``len(encode(answer_prefix + continuation))`` labelled tokens are the continuation's.
        """
        core = self.core
        encoded = core.encode(batch["pixel_values"], batch["image_sizes"], batch["has_image"])
        levels = core.select(encoded, batch)[0] if self.level is None else torch.full((1,), self.level)
        visual = core.pack(encoded, batch["image_sizes"], levels)
        spliced = core.splice(batch["input_ids"], batch["attention_mask"], visual, batch["labels"])
        hidden = core.hidden_states(spliced)  # (1, S, C): one LLM pass
        token_logprob, _ = core.answer_scores(hidden, spliced.labels)  # (n_answer,) in sequence order
        n = len(self.tokenizer.encode(self.processor.template.answer_prefix + continuation,
                                      add_special_tokens=False))  # fmt: skip
        if n == 0 or n > len(token_logprob):
            raise ValueError(f"continuation {continuation!r} tokenises to {n} tokens; cannot score it")
        where = (spliced.labels[:, 1:] != -100).nonzero()[:n]  # (n, 2) positions predicting them
        logits = core.llava.lm_head(hidden[where[:, 0], where[:, 1]])  # (n, V)
        greedy = bool((logits.argmax(-1) == spliced.labels[where[:, 0], where[:, 1] + 1]).all())
        has_image = bool(batch["has_image"][0])
        granularity = core.scaler.granularities[int(levels[0])] if has_image else 0
        tokens = 0 if visual[0] is None else len(visual[0])
        return float(token_logprob[:n].sum()), greedy, tokens, granularity

    def generate_until_multi_round(self, requests) -> list[str]:
        """Not supported: avglab scores single-turn questions."""
        raise NotImplementedError("avglab's lmms-eval model answers single-round requests only")

    # ------------------------------------------------------------------ routing and token statistics
    def record_stats(
        self, task, doc_id, visual_tokens: int, granularity: int, request: str = "generate_until", **extra
    ) -> None:
        """One request's routing and token counts.

        ``visual_tokens``: fed to the LLM's first layer (newlines included); ``granularity``: tokens per
        grid of the chosen level (0 without an image); ``extra``: for generation, ``visual_tokens_full``
        (at the finest level), ``input_tokens`` and ``output_tokens``.
        """
        stats = {"task": task, "doc_id": doc_id, "request": request, "selector": self.selector_name,
                 "granularity": int(granularity), "visual_tokens": int(visual_tokens), **extra}  # fmt: skip
        self.request_stats.append(stats)
        if self.stats_dir is not None:
            with open(self.stats_dir / REQUESTS_FILE, "a") as f:
                f.write(json.dumps(stats, default=str) + "\n")
        log.debug("avglab %s/%s: %d visual tokens (%d per grid)", task, doc_id, visual_tokens, granularity)

    def summary(self) -> dict:
        """Per task and overall: requests, visual tokens, granularity counts, input/output tokens.

        ``visual_token_share_of_full``: the generation requests' visual tokens over the finest level's.
        """
        groups = defaultdict(list)
        for s in self.request_stats:
            groups[s["task"]].append(s)
            groups["_all"].append(s)

        def summarise(rows: list[dict]) -> dict:
            full = [r["visual_tokens_full"] for r in rows if "visual_tokens_full" in r]
            gen = [r for r in rows if "input_tokens" in r]
            out = {
                "requests": len(rows),
                "visual_tokens_mean": sum(r["visual_tokens"] for r in rows) / len(rows),
                "granularity_counts": dict(sorted(Counter(r["granularity"] for r in rows).items())),
                "input_tokens": sum(r["input_tokens"] for r in gen),
                "output_tokens": sum(r["output_tokens"] for r in gen),
            }
            if full and sum(full):
                out["visual_token_share_of_full"] = sum(r["visual_tokens"] for r in gen) / sum(full)
            return out

        by_task = {task: summarise(rows) for task, rows in groups.items() if task != "_all"}
        overall = summarise(groups["_all"]) if self.request_stats else {}
        return {"selector": self.selector_name, "by_task": by_task, "overall": overall}

    def write_summary(self) -> None:
        """``<stats_dir>/avglab_summary.json`` (rewritten after each request type)."""
        if self.stats_dir is not None:
            (self.stats_dir / SUMMARY_FILE).write_text(json.dumps(self.summary(), indent=2, default=str))

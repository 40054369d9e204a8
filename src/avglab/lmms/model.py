"""``AvgLabLMM``: an lmms-eval model over an avglab export, answering through avglab's evaluation path.

Usage (lmms-eval installed; avglab registers itself through the ``lmms_eval.models`` entry point)::

    python -m lmms_eval --model avglab --model_args pretrained=<export folder>,selector=router,batch_size=8 \
        --tasks textvqa_val,mme

Only the request interface lmms-eval hands to a "simple" model is used: ``request.args`` is
``(context, gen_kwargs, doc_to_visual, doc_id, task, split)`` for ``generate_until`` and
``(context, continuation or doc_to_target, doc_to_visual, doc_id, task, split)`` for ``loglikelihood``;
documents come from ``self.task_dict[task][split][doc_id]`` (lmms-eval sets ``task_dict``). Without
lmms-eval installed the class still imports (its base falls back to a plain object), so it can be
tested offline with hand-built requests.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import torch

from avglab.data.collate import collate
from avglab.data.processor import SampleProcessor
from avglab.model.router import FixedSelector
from avglab.stages.evaluate import EvalStage

try:  # lmms-eval's base class when installed; the plugin needs nothing else from it
    from lmms_eval.api.model import lmms as _Base
except ImportError:  # offline use and tests

    class _Base:  # noqa: D101 - stand-in with the two helpers lmms-eval's base provides
        is_simple = True

        def __init__(self) -> None:
            self._rank, self._world_size = 0, 1

        @classmethod
        def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
            """``key=value,key=value`` -> constructor kwargs (as lmms-eval's ``simple_parse_args_string``)."""
            args = dict(kv.split("=", 1) for kv in arg_string.split(",") if kv)
            args.update({k: v for k, v in (additional_config or {}).items() if v is not None})
            return cls(**args)


log = logging.getLogger(__name__)


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


class AvgLabLMM(_Base):
    """avglab's core behind lmms-eval's ``generate_until`` / ``loglikelihood`` interface.

    Args:
        pretrained: an export folder (``python -m avglab.export``).
        selector: ``router``, ``full`` or a fixed granularity in tokens per tile (e.g. ``144``).
        batch_size: generation requests per batched (left-padded) pass.
        max_new_tokens: default generation budget (a request's ``gen_kwargs`` override it).
        template: chat template of the checkpoint (``vicuna_v1``, ``llama_3``).
        device: torch device.
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        selector: str = "router",
        batch_size: int | str = 1,
        max_new_tokens: int | str = 16,
        template: str = "vicuna_v1",
        device: str = "cpu",
        **unused,
    ) -> None:
        super().__init__()
        from avglab.export import load_pretrained  # late: builds the whole data/model stack

        if unused:
            log.warning("avglab: ignoring model_args %s", sorted(unused))
        tokenizer, image_processor, core = load_pretrained(pretrained)
        core = core.to(device)
        self.setup(core, tokenizer, image_processor, selector, int(batch_size), int(max_new_tokens), template)

    @classmethod
    def from_parts(
        cls, core, tokenizer, image_processor, selector="router", batch_size=1, max_new_tokens=16,
        template="vicuna_v1",
    ) -> AvgLabLMM:  # fmt: skip
        """The plugin over an in-memory core (tests, notebooks) instead of an export folder."""
        self = cls.__new__(cls)
        _Base.__init__(self)
        self.setup(core, tokenizer, image_processor, selector, batch_size, max_new_tokens, template)
        return self

    def setup(self, core, tokenizer, image_processor, selector, batch_size, max_new_tokens, template) -> None:
        """Shared construction: the selector, the sample processor and avglab's evaluation stage."""
        if batch_size < 1:
            raise ValueError(f"model_args batch_size={batch_size}: must be >= 1")
        choice = parse_selector(str(selector), core.scaler.granularities)
        if choice is None:
            core.selector = None
        elif choice != "router":
            core.selector = FixedSelector(core.scaler.num_levels, choice)
        elif core.selector is None:
            raise ValueError("model_args selector=router: the export has no router; use full or a level")
        self.core, self.tokenizer, self.batch_size_per_gpu = core.eval(), tokenizer, batch_size
        self.processor = SampleProcessor(tokenizer, image_processor, template)
        self.evaluator = EvalStage(core, tokenizer, Path(tempfile.gettempdir()), str(selector), False,
                                   max_new_tokens)  # fmt: skip
        self.max_new_tokens = max_new_tokens
        self.request_stats: list[dict] = []  # per request: task, doc_id, visual tokens, granularity
        self.task_dict: dict = {}

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

    # ------------------------------------------------------------------ lmms-eval API
    @torch.no_grad()
    def generate_until(self, requests) -> list[str]:
        """Greedy answers, ``batch_size`` requests per left-padded pass (avglab's evaluation path)."""
        answers = []
        for start in range(0, len(requests), self.batch_size_per_gpu):
            chunk = [r.args for r in requests[start : start + self.batch_size_per_gpu]]
            budget = max(int(a[1].get("max_new_tokens", self.max_new_tokens)) for a in chunk)
            samples = [self.sample(c, self.visuals(v, d, t, s), None, d, t) for c, _, v, d, t, s in chunk]
            self.evaluator.max_new_tokens = budget
            records = self.evaluator.answer(collate(samples, self.tokenizer.pad_token_id), None)
            for (_, kwargs, _, doc_id, task, _), record in zip(chunk, records, strict=True):
                text = record["prediction"]
                for stop in kwargs.get("until") or []:
                    text = text.split(stop)[0] if stop else text
                answers.append(text)
                self.record_stats(task, doc_id, record["visual_tokens"], record["granularity"])
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
            score, greedy, tokens, granularity = self.continuation_score(collate([sample], 0), continuation)
            out.append((score, greedy))
            self.record_stats(task, doc_id, tokens, granularity)
        return out

    def continuation_score(self, batch: dict, continuation: str) -> tuple[float, bool, int, int]:
        """Sum of log P(continuation tokens), greedy flag, visual tokens and granularity of one sample.

        The template's end-of-turn tokens are not part of the continuation: the answer piece is
        ``answer_prefix + continuation + turn_end``, and its first
        ``len(encode(answer_prefix + continuation))`` labelled tokens are the continuation's.
        """
        core = self.core
        encoded = core.encode(batch["pixel_values"], batch["image_sizes"], batch["has_image"])
        levels, _ = core.select(encoded, batch)
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

    def record_stats(self, task, doc_id, visual_tokens: int, granularity: int) -> None:
        """Visual tokens fed to the LLM's first layer (newlines included) for one request."""
        self.request_stats.append(
            {"task": task, "doc_id": doc_id, "visual_tokens": int(visual_tokens), "granularity": granularity}
        )
        log.debug("avglab %s/%s: %d visual tokens (%d per grid)", task, doc_id, visual_tokens, granularity)

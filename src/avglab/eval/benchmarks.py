"""Benchmark metrics matching lmms-eval's definitions, as rank-reducible torchmetrics ``Metric`` classes.

Every state is a tensor reduced with ``dist_reduce_fx="sum"``, so the metrics sync across DDP ranks and
support ``merge_state``. Predictions are expected as decoded, stripped text (as lmms-eval's model wrappers
return them). Where lmms-eval itself is ambiguous or degenerate the choice is documented on the class.
"""

from __future__ import annotations

import statistics
import string
from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

from avglab.eval.vqa_normalize import (
    extract_option_letter,
    normalize_vqa_answer,
    parse_mme_answer,
    parse_pope_answer,
)

References = Sequence[str | Sequence[str]]
MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                  "artwork", "OCR")  # fmt: skip
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
_MME_INDEX = {name.lower(): i for i, name in enumerate(MME_PERCEPTION + MME_COGNITION)}
_DROP_PUNCT = str.maketrans("", "", string.punctuation)


def _as_list(refs: str | Sequence[str]) -> list[str]:
    return [refs] if isinstance(refs, str) else list(refs)


# ----------------------------------------------------------------------------------------- per-sample rules
def vqa_score(prediction: str, references: Sequence[str]) -> float:
    """VQA accuracy of one prediction (lmms-eval / EvalAI leave-one-out rule).

    After ``normalize_vqa_answer`` on both sides, the score is the mean over the ``n`` leave-one-out
    subsets of ``min(1, #matches among the other n-1 answers / 3)``. With 10 answers, 1/2/3/4+ matches
    give 0.3/0.6/0.9/1.0.

    Other list lengths: ``n >= 2`` uses the same formula (as lmms-eval does, e.g. 5 answers); ``n == 1``
    is scored as plain exact match (lmms-eval would always give 0, its only subset being empty); ``n == 0``
    scores 0 (as lmms-eval's VizWiz task).

    Args:
        prediction: Model answer.
        references: Human answers (usually 10, duplicates included).

    Returns:
        The score in [0, 1].
    """
    pred = normalize_vqa_answer(prediction)
    refs = [normalize_vqa_answer(r) for r in references]
    if len(refs) <= 1:
        return float(bool(refs) and refs[0] == pred)
    matches = sum(r == pred for r in refs)
    return statistics.mean(min(1.0, (matches - (r == pred)) / 3) for r in refs)


def levenshtein(a: str, b: str) -> int:
    """Edit distance (unit-cost insertions, deletions and substitutions).

    Args:
        a: First string.
        b: Second string.

    Returns:
        The Levenshtein distance.
    """
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls_score(prediction: str, references: Sequence[str], threshold: float = 0.5) -> float:
    """ANLS of one prediction, exactly as lmms-eval's ``anls`` metric (DocVQA).

    The distance is taken between the lower-cased, white-space-folded strings, but normalised by the
    length of the *raw* strings (``max(len(ref.upper()), len(pred.upper()))``), as lmms-eval does. The score
    is ``1 - min`` normalised distance over the references, set to 0 when it is below ``threshold``; a
    score of exactly ``threshold`` (NLD == 0.5) is kept, as in lmms-eval (the DocVQA paper zeroes it).

    Args:
        prediction: Model answer.
        references: Accepted answers; an empty list scores 0.
        threshold: Similarity below which the score is zeroed.

    Returns:
        The score in [0, 1].
    """
    pred = " ".join(prediction.strip().lower().split())
    distances = []
    for ref in references:
        length = max(len(ref.upper()), len(prediction.upper()))
        dist = levenshtein(" ".join(ref.strip().lower().split()), pred)
        distances.append(0.0 if length == 0 else dist / length)
    if not distances:
        return 0.0
    score = 1.0 - min(distances)
    return 0.0 if score < threshold else score


def relaxed_correctness(prediction: str, target: str, max_relative_change: float = 0.05) -> bool:
    """ChartQA relaxed correctness, exactly as lmms-eval's ``relaxed_correctness``.

    Both strings are parsed as floats (a trailing "%" divides by 100, so "50%" equals "0.5"). If both
    parse and the target is non-zero, the prediction is correct when ``|pred - target| / |target| <=
    max_relative_change`` (boundary included); otherwise (non-numeric, or target 0) the lower-cased strings
    must be equal.

    Args:
        prediction: Model answer.
        target: Reference answer.
        max_relative_change: Allowed relative error.

    Returns:
        Whether the prediction counts as correct.
    """

    def to_float(text: str) -> float | None:
        try:
            return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
        except ValueError:
            return None

    pred, tgt = to_float(prediction), to_float(target)
    if pred is not None and tgt:
        return abs(pred - tgt) / abs(tgt) <= max_relative_change
    return prediction.lower() == target.lower()


# ------------------------------------------------------------------------------------------------- metrics
class _MeanScore(Metric):
    """Mean of per-sample scores, kept as a float64 sum and an int64 count."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("score_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def _add(self, scores: list[float]) -> None:
        self.score_sum += sum(scores)
        self.total += len(scores)

    def compute(self) -> Tensor:
        """Returns the mean score (0 before any update)."""
        return self.score_sum / self.total.clamp(min=1)


class VQAAccuracy(_MeanScore):
    """VQA accuracy as lmms-eval's TextVQA / VizWiz tasks; see ``vqa_score``.

    (lmms-eval's VQAv2 task differs slightly: it normalises the human answers only when they disagree.)
    """

    def update(self, predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
        """Adds a batch.

        Args:
            predictions: Model answers.
            references: Per sample, its human answers (usually 10).
        """
        self._add([vqa_score(p, _as_list(r)) for p, r in zip(predictions, references, strict=True)])


class ANLS(_MeanScore):
    """Average normalised Levenshtein similarity (DocVQA, InfoVQA); see ``anls_score``.

    Args:
        threshold: Similarity below which a sample scores 0.
        **kwargs: Passed to ``Metric``.
    """

    def __init__(self, threshold: float = 0.5, **kwargs) -> None:
        super().__init__(**kwargs)
        self.threshold = threshold

    def update(self, predictions: Sequence[str], references: References) -> None:
        """Adds a batch.

        Args:
            predictions: Model answers.
            references: Per sample, one accepted answer or a list of them.
        """
        pairs = zip(predictions, references, strict=True)
        self._add([anls_score(p, _as_list(r), self.threshold) for p, r in pairs])


class RelaxedAccuracy(_MeanScore):
    """ChartQA relaxed accuracy: a sample is right when ``relaxed_correctness`` holds for any reference.

    Args:
        max_relative_change: Allowed relative error for numeric answers.
        **kwargs: Passed to ``Metric``.
    """

    def __init__(self, max_relative_change: float = 0.05, **kwargs) -> None:
        super().__init__(**kwargs)
        self.max_relative_change = max_relative_change

    def update(self, predictions: Sequence[str], references: References) -> None:
        """Adds a batch.

        Args:
            predictions: Model answers.
            references: Per sample, one answer or a list of them.
        """
        tol = self.max_relative_change
        pairs = zip(predictions, references, strict=True)
        self._add([float(any(relaxed_correctness(p, t, tol) for t in _as_list(r))) for p, r in pairs])


class ExactMatch(_MeanScore):
    """Exact-match accuracy, GQA-style text or multiple-choice option letter.

    ``mode="text"`` (GQA, as lmms-eval's ``exact_match`` with ``ignore_case`` and ``ignore_punctuation``):
    both sides lower-cased, ASCII punctuation deleted, surrounding white space stripped. ``mode="option"``
    (ScienceQA, AI2D, MMBench): ``extract_option_letter`` on prediction and reference; an unparsable
    prediction is wrong.

    Args:
        mode: "text" or "option".
        letters: Valid option letters (option mode).
        **kwargs: Passed to ``Metric``.
    """

    def __init__(self, mode: str = "text", letters: str = "ABCDEFGH", **kwargs) -> None:
        super().__init__(**kwargs)
        if mode not in ("text", "option"):
            raise ValueError(f"mode must be 'text' or 'option', got {mode!r}")
        self.mode, self.letters = mode, letters

    def _normalize(self, text: str) -> str | None:
        if self.mode == "option":
            return extract_option_letter(text, self.letters)
        return text.lower().translate(_DROP_PUNCT).strip()

    def update(self, predictions: Sequence[str], references: References) -> None:
        """Adds a batch.

        Args:
            predictions: Model answers.
            references: Per sample, one answer (or option letter) or a list of accepted ones.
        """
        scores = []
        for pred, refs in zip(predictions, references, strict=True):
            p = self._normalize(pred)
            scores.append(float(p is not None and any(p == self._normalize(r) for r in _as_list(refs))))
        self._add(scores)


class MMEScore(Metric):
    """MME perception and cognition scores (lmms-eval's ``mme_aggregate_results``).

    Per subtask: ``100 * accuracy + 100 * accuracy+``, accuracy+ being the share of images whose two
    questions are both right; "perception" sums the 10 perception subtasks, "cognition" the 4 cognition
    ones (subtasks never seen contribute nothing, as in lmms-eval).

    Design: to stay tensor-only and rank-reducible, images are identified by a caller-given integer index
    in ``[0, max_images)`` (e.g. the position of lmms-eval's ``question_id``, the image path, in the sorted
    list of the split's unique ids, identical on every rank). Two ``(14, max_images)`` int64 tables count
    the questions and the correct answers per (subtask, image); the two questions of an image may
    therefore land on different ranks. ``compute`` raises if a seen image does not have exactly two
    questions (lmms-eval asserts the same). Subtask names are matched case-insensitively.

    Args:
        max_images: Size of the image index (MME has 1187 images in total).
        **kwargs: Passed to ``Metric``.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, max_images: int = 2048, **kwargs) -> None:
        super().__init__(**kwargs)
        self.max_images = max_images
        shape = (len(_MME_INDEX), max_images)
        self.add_state("questions", torch.zeros(shape, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("correct", torch.zeros(shape, dtype=torch.int64), dist_reduce_fx="sum")

    def update(
        self,
        image_ids: Sequence[int],
        subtasks: Sequence[str],
        predictions: Sequence[str],
        answers: Sequence[str],
    ) -> None:
        """Adds a batch of questions.

        Args:
            image_ids: Integer image index per question, in ``[0, max_images)``.
            subtasks: MME subtask (category) per question, e.g. "existence", "OCR".
            predictions: Model answers, parsed with ``parse_mme_answer``.
            answers: Ground truth "yes"/"no" per question.
        """
        rows, cols, right = [], [], []
        for image, subtask, pred, answer in zip(image_ids, subtasks, predictions, answers, strict=True):
            gt = answer.lower().strip().replace(".", "")
            if subtask.lower() not in _MME_INDEX or gt not in ("yes", "no"):
                raise ValueError(f"unknown MME subtask {subtask!r} or answer {answer!r} (need yes/no)")
            if not 0 <= int(image) < self.max_images:
                raise ValueError(f"image index {image} outside [0, {self.max_images})")
            rows.append(_MME_INDEX[subtask.lower()])
            cols.append(int(image))
            right.append(int(parse_mme_answer(pred) == gt))
        index = tuple(torch.tensor(x, dtype=torch.long, device=self.device) for x in (rows, cols))
        right_t = torch.tensor(right, dtype=torch.int64, device=self.device)
        self.questions.index_put_(index, torch.ones_like(right_t), accumulate=True)
        self.correct.index_put_(index, right_t, accumulate=True)

    def compute(self) -> dict[str, Tensor]:
        """Returns "perception", "cognition" and the score of every subtask seen."""
        zero = torch.tensor(0.0, dtype=torch.float64, device=self.device)
        out = {"perception": zero, "cognition": zero}
        for name in MME_PERCEPTION + MME_COGNITION:
            seen, correct = self.questions[_MME_INDEX[name.lower()]], self.correct[_MME_INDEX[name.lower()]]
            if not seen.any():
                continue
            if ((seen != 0) & (seen != 2)).any():
                raise ValueError(f"MME subtask {name!r}: every image needs exactly 2 questions")
            images = (seen > 0).sum()
            acc = correct.sum().double() / seen.sum()
            acc_plus = (correct == 2).sum().double() / images
            out[name] = 100.0 * (acc + acc_plus)
            group = "perception" if name in MME_PERCEPTION else "cognition"
            out[group] = out[group] + out[name]
        return out


class POPEMetrics(Metric):
    """POPE accuracy, precision, recall and F1 with "yes" as the positive class.

    Predictions are parsed with ``parse_pope_answer``. The state is a 2x3 confusion table (ground truth
    yes/no x prediction yes/no/other). With ``other_as_no=True`` (default) an unparsable answer counts as
    "no". With ``other_as_no=False`` it follows lmms-eval's aggregation literally: wrong for accuracy, but
    neither a false positive nor a false negative for precision/recall. Ratios with a zero denominator
    are 0, as in lmms-eval.

    Args:
        other_as_no: How to count answers that are neither "yes" nor "no".
        **kwargs: Passed to ``Metric``.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, other_as_no: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.other_as_no = other_as_no
        self.add_state("confusion", torch.zeros(2, 3, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, predictions: Sequence[str], answers: Sequence[str]) -> None:
        """Adds a batch.

        Args:
            predictions: Model answers.
            answers: Ground truth "yes"/"no" per question.
        """
        labels, counts = {"yes": 0, "no": 1, "other": 2}, [[0] * 3 for _ in range(2)]
        for pred, gt in zip(predictions, answers, strict=True):
            gt = gt.lower().strip()
            if gt not in ("yes", "no"):
                raise ValueError(f"POPE answers must be 'yes' or 'no', got {gt!r}")
            counts[labels[gt]][labels[parse_pope_answer(pred)]] += 1
        self.confusion += torch.tensor(counts, dtype=torch.int64, device=self.device)

    def compute(self) -> dict[str, Tensor]:
        """Returns "accuracy", "precision", "recall" and "f1"."""
        c = self.confusion.double()
        tp, fp, total = c[0, 0], c[1, 0], c.sum()
        tn = c[1, 1] + (c[1, 2] if self.other_as_no else 0.0)
        fn = c[0, 1] + (c[0, 2] if self.other_as_no else 0.0)

        def ratio(num: Tensor, den: Tensor) -> Tensor:
            return num / den if den > 0 else torch.zeros_like(num)

        precision, recall = ratio(tp, tp + fp), ratio(tp, tp + fn)
        return {
            "accuracy": ratio(tp + tn, total),
            "precision": precision,
            "recall": recall,
            "f1": ratio(2 * precision * recall, precision + recall),
        }

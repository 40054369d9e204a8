"""Benchmark metrics against small hand-computed cases (lmms-eval definitions)."""

import pytest
import torch

from avglab.eval.benchmarks import (
    ANLS,
    ExactMatch,
    MMEScore,
    POPEMetrics,
    RelaxedAccuracy,
    VQAAccuracy,
    anls_score,
    extract_option_letter,
    levenshtein,
    normalize_vqa_answer,
    parse_mme_answer,
    parse_pope_answer,
    relaxed_correctness,
    vqa_score,
)


# ------------------------------------------------------------------------------------ VQA normalisation
@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("dont", "don't"),  # contraction restored
        ("Whats up", "what's up"),
        ("Two", "2"),  # number word -> digit
        ("none", "0"),
        ("the cat", "cat"),  # articles dropped
        ("an apple a day", "apple day"),
        ("yes.", "yes"),  # a period not followed by a digit is removed
        ("1.5", "1.5"),  # ... but a decimal point stays
        ("3,000", "3000"),  # commas are deleted ...
        ("red,blue", "redblue"),  # ... even between words (EvalAI drops "," before splitting punctuation)
        ("What?", "what"),
        ("t-shirt", "t shirt"),  # punctuation inside a word becomes a space
        ("red - blue", "red blue"),  # ... and is deleted when next to a space
        ("(left)", "left"),
        ("man's", "man 's"),
        ("  Two\tDogs \n", "2 dogs"),
    ],
)
def test_normalize_vqa_answer(raw, expected):
    assert normalize_vqa_answer(raw) == expected


def test_normalize_vqa_answer_period_quirk():
    # EvalAI passes re.UNICODE (32) as re.sub's count: only the first 32 periods are removed.
    assert normalize_vqa_answer("x" + "." * 40) == "x" + "." * 8


# ------------------------------------------------------------------------------------------- VQA accuracy
@pytest.mark.parametrize(
    ("k", "expected"),
    [
        # 10 answers, k of them equal to the prediction. Leave-one-out: dropping one of the 10 - k others
        # leaves k matches, dropping a matching one leaves k - 1; each subset scores min(1, m / 3).
        (0, 0.0),
        (1, 0.3),  # (9 * 1/3 + 1 * 0) / 10 = 3/10
        (2, 0.6),  # (8 * 2/3 + 2 * 1/3) / 10 = 18/30
        (3, 0.9),  # (7 * 1 + 3 * 2/3) / 10 = 9/10
        (4, 1.0),  # (6 * 1 + 4 * 1) / 10
        (10, 1.0),
    ],
)
def test_vqa_score_leave_one_out(k, expected):
    answers = ["2"] * k + ["3"] * (10 - k)
    assert vqa_score("two.", answers) == pytest.approx(expected)  # "two." normalises to "2"


def test_vqa_score_other_lengths():
    # 5 answers, 2 matches: (3 * 2/3 + 2 * 1/3) / 5 = 8/15
    assert vqa_score("cat", ["cat", "cat", "dog", "dog", "dog"]) == pytest.approx(8 / 15)
    assert vqa_score("The cat", ["cat"]) == 1.0  # single reference: exact match after normalisation
    assert vqa_score("dog", ["cat"]) == 0.0
    assert vqa_score("cat", []) == 0.0


def test_vqa_accuracy_metric_mean():
    metric = VQAAccuracy()
    metric.update(["2", "yes"], [["2"] * 2 + ["3"] * 8, ["yes"] * 3 + ["no"] * 7])
    metric.update(["no"], [["no"] * 10])
    assert metric.compute().item() == pytest.approx((0.6 + 0.9 + 1.0) / 3)
    with pytest.raises(ValueError):
        metric.update(["a", "b"], [["a"]])


# --------------------------------------------------------------------------------------------------- ANLS
def test_levenshtein():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3
    assert levenshtein("abc", "abc") == 0


def test_anls_threshold():
    assert anls_score("hello", ["hello"]) == 1.0
    assert anls_score("  HeLLo ", ["hello"]) == 1.0  # lower-cased and stripped before the distance
    assert anls_score("hallo", ["hello"]) == pytest.approx(0.8)  # 1 - 1/5
    assert anls_score("hallo", ["xyz", "hello"]) == pytest.approx(0.8)  # closest reference counts
    assert anls_score("ax", ["ab"]) == 0.5  # NLD exactly 0.5: kept, as lmms-eval (`< 0.5` zeroes)
    assert anls_score("xyc", ["abc"]) == 0.0  # 1 - 2/3 = 1/3 < 0.5 -> 0
    assert anls_score(" hallo ", ["hello"]) == pytest.approx(1 - 1 / 7)  # lmms-eval divides by raw length
    assert anls_score("x", []) == 0.0


def test_anls_metric():
    metric = ANLS()
    metric.update(["hello", "xyc", "hallo"], ["hello", "abc", ["hello", "world"]])
    assert metric.compute().item() == pytest.approx((1.0 + 0.0 + 0.8) / 3)


# -------------------------------------------------------------------------------------- relaxed accuracy
def test_relaxed_correctness_boundary_and_percent():
    assert relaxed_correctness("105", "100")  # |105 - 100| / 100 = 0.05: boundary included
    assert relaxed_correctness("95", "100")
    assert not relaxed_correctness("105.1", "100")
    assert not relaxed_correctness("94.9", "100")
    assert relaxed_correctness("50%", "0.5")  # "50%" parses as 0.5
    assert relaxed_correctness("52%", "50%")  # |0.52 - 0.5| / 0.5 = 0.04
    assert not relaxed_correctness("50%", "50")
    assert relaxed_correctness("0", "0")  # target 0: exact string match
    assert not relaxed_correctness("0.0", "0")
    assert relaxed_correctness("Yes", "yes")  # non-numeric: case-insensitive exact match
    assert not relaxed_correctness("yes ", "yes")


def test_relaxed_accuracy_metric():
    metric = RelaxedAccuracy()
    metric.update(["10.4", "Blue", "12"], [["abc", "10"], "blue", "10"])
    assert metric.compute().item() == pytest.approx(2 / 3)


# ------------------------------------------------------------------------------------------- exact match
@pytest.mark.parametrize(
    ("text", "letter"),
    [
        ("B", "B"),
        ("(B)", "B"),
        ("b", "B"),
        ("B. cat", "B"),
        ("The answer is B", "B"),
        ("The answer is (C).", "C"),
        ("Answer: D", "D"),
        ("A or B", None),  # two distinct letters: ambiguous
        ("cat", None),
        ("", None),
    ],
)
def test_extract_option_letter(text, letter):
    assert extract_option_letter(text) == letter


def test_exact_match_option_mode():
    metric = ExactMatch(mode="option")
    metric.update(["B", "(C)", "A. dog", "The answer is D", "none"], ["B", "B", "A", "D", "A"])
    assert metric.compute().item() == pytest.approx(3 / 5)


def test_exact_match_text_mode():
    metric = ExactMatch()
    # lower-case, punctuation deleted, stripped; no article removal (lmms-eval's GQA exact_match)
    metric.update(["Yes.", " Red ", "the cat", "t-shirt"], ["yes", "red", "cat", ["tshirt", "shirt"]])
    assert metric.compute().item() == pytest.approx(3 / 4)
    with pytest.raises(ValueError):
        ExactMatch(mode="letters")


# --------------------------------------------------------------------------------------------------- MME
def test_parse_mme_answer():
    assert parse_mme_answer("Yes.") == "yes"
    assert parse_mme_answer("Yes, it is.") == "yes"
    assert parse_mme_answer("Not sure") == "no"  # "no" inside the first four characters, like lmms-eval
    assert parse_mme_answer("n") == "no"
    assert parse_mme_answer("maybe") == "other"
    assert parse_mme_answer("There is no dog") == "other"  # yes/no only looked for in the prefix
    assert parse_mme_answer("I guess yes") == "other"


# (image index, subtask, prediction, answer)
MME_DATA = [
    (0, "existence", "Yes", "Yes"),  # image 0: both right
    (0, "existence", "No.", "No"),
    (1, "existence", "Yes", "Yes"),  # image 1: one right
    (1, "existence", "yes", "No"),
    (2, "count", "no", "Yes"),  # image 2: one right
    (2, "count", "no", "No"),
    (3, "code_reasoning", "Yes, it is.", "Yes"),  # image 3: both right
    (3, "code_reasoning", "Not sure", "No"),
    (4, "commonsense_reasoning", "maybe", "Yes"),  # image 4: none right ("other", then "yes")
    (4, "commonsense_reasoning", "y", "No"),
]


def _columns(rows):
    return [list(col) for col in zip(*rows, strict=True)]


def test_mme_score():
    metric = MMEScore()
    metric.update(*_columns(MME_DATA))
    out = {k: v.item() for k, v in metric.compute().items()}
    # existence: acc 3/4, acc+ 1/2 -> 75 + 50; count: acc 1/2, acc+ 0 -> 50
    # code_reasoning: 100 + 100; commonsense_reasoning: 0 + 0
    assert out == pytest.approx(
        {
            "existence": 125.0,
            "count": 50.0,
            "perception": 175.0,
            "code_reasoning": 200.0,
            "commonsense_reasoning": 0.0,
            "cognition": 200.0,
        }
    )


def test_mme_rejects_bad_input():
    metric = MMEScore(max_images=4)
    with pytest.raises(ValueError):
        metric.update([4], ["existence"], ["yes"], ["yes"])  # index out of range
    with pytest.raises(ValueError):
        metric.update([0], ["colour"], ["yes"], ["yes"])  # unknown subtask
    metric.update([0], ["ocr"], ["yes"], ["yes"])  # subtask names are case-insensitive
    with pytest.raises(ValueError, match="exactly 2"):
        metric.compute()  # an image with a single question


# -------------------------------------------------------------------------------------------------- POPE
def test_parse_pope_answer():
    assert parse_pope_answer("Yes, there is a cat.") == "yes"
    assert parse_pope_answer("There is no dog.") == "no"
    assert parse_pope_answer("<think>yes or no?</think> No") == "no"
    assert parse_pope_answer("I cannot tell") == "other"
    assert parse_pope_answer("Nothing here") == "other"  # whole words only


POPE_YES = ["Yes", "yes, there is a cat.", "No", "I cannot tell"]  # answers to questions whose truth is "yes"
POPE_NO = ["no", "No, there is not.", "Yes", "Hard to say"]  # ... and to questions whose truth is "no"
POPE_PREDS = POPE_YES + POPE_NO
POPE_GTS = ["yes"] * 4 + ["no"] * 4


def test_pope_metrics():
    metric = POPEMetrics()
    metric.update(POPE_PREDS, POPE_GTS)
    out = {k: v.item() for k, v in metric.compute().items()}
    # "other" counted as "no": TP 2, FN 2 ("No", "I cannot tell"), FP 1, TN 3 ("no", "No, ...", "Hard to say")
    # accuracy 5/8, precision 2/3, recall 2/4, F1 = 2 * (1/3) / (7/6) = 4/7
    assert out == pytest.approx({"accuracy": 5 / 8, "precision": 2 / 3, "recall": 1 / 2, "f1": 4 / 7})

    literal = POPEMetrics(other_as_no=False)
    literal.update(POPE_PREDS, POPE_GTS)
    out = {k: v.item() for k, v in literal.compute().items()}
    # lmms-eval's literal aggregation: the two unparsed answers are wrong (accuracy 4/8) but neither is
    # a false negative nor a true negative: TP 2, FN 1, FP 1 -> precision 2/3, recall 2/3, F1 2/3
    assert out == pytest.approx({"accuracy": 4 / 8, "precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3})


def test_pope_zero_denominators():
    metric = POPEMetrics()
    metric.update(["no", "no"], ["no", "no"])
    out = {k: v.item() for k, v in metric.compute().items()}
    assert out == {"accuracy": 1.0, "precision": 0.0, "recall": 0.0, "f1": 0.0}


# ----------------------------------------------------------------------------------- two-rank reduction
CASES = [
    (VQAAccuracy, [["2", "yes", "no", "cat"], [["2"] * 2 + ["3"] * 8, ["yes"] * 3 + ["no"] * 7, ["no"], []]]),
    (ANLS, [["hello", "xyc", "hallo", "ax"], ["hello", "abc", ["hello", "world"], "ab"]]),
    (RelaxedAccuracy, [["10.4", "Blue", "12", "50%"], [["abc", "10"], "blue", "10", "0.5"]]),
    (ExactMatch, [["Yes.", " Red ", "the cat", "x"], ["yes", "red", "cat", "y"]]),
    (MMEScore, _columns(MME_DATA)),
    (POPEMetrics, [POPE_PREDS, POPE_GTS]),
]


def _as_floats(value):
    return {k: v.item() for k, v in value.items()} if isinstance(value, dict) else value.item()


@pytest.mark.parametrize(("make", "columns"), CASES, ids=[c[0].__name__ for c in CASES])
def test_two_rank_reduction(make, columns):
    full = make()
    full.update(*columns)
    expected = _as_floats(full.compute())

    # Interleaved split, as DistributedSampler does: an MME image's two questions land on different ranks.
    ranks = [make(), make()]
    for r, metric in enumerate(ranks):
        metric.update(*[col[r::2] for col in columns])
    ranks[0].merge_state(ranks[1])
    assert _as_floats(ranks[0].compute()) == pytest.approx(expected)

    # The DDP path: torchmetrics all-gathers every state and applies its "sum" reduction.
    ranks = [make(), make()]
    for r, metric in enumerate(ranks):
        metric.update(*[col[r::2] for col in columns])
    other = {id(v): ranks[1].metric_state[k] for k, v in ranks[0].metric_state.items()}
    ranks[0].sync(dist_sync_fn=lambda t, group=None: [t, other[id(t)]], distributed_available=lambda: True)
    for name, value in full.metric_state.items():
        assert isinstance(value, torch.Tensor)  # tensor states only, no python lists
        torch.testing.assert_close(ranks[0].metric_state[name], value)

"""Answer normalisation and parsing as lmms-eval does it: EvalAI VQA, MME/POPE yes-no, option letters.

``normalize_vqa_answer`` is a faithful port of ``EvalAIAnswerProcessor`` (lmms-eval
``_task_utils/vqa_eval_metric.py``, itself copied from MMF/pythia), quirks included, so that scores match
lmms-eval's to the last digit.
"""

from __future__ import annotations

import re

# Keys containing capitals ("Im", "Ive", ...) never match (words are lower-cased first) and
# "somebody'd" -> "somebodyd" is backwards; both are kept because EvalAI has them.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}  # fmt: skip
_NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = {"a", "an", "the"}
# EvalAI's regex: "(?!<=\d)" is a (typo'd) look-ahead that always holds, so in effect every "." not
# followed by a digit is removed ("yes." -> "yes", "1.5" kept).
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")
_OPTION_SEPARATORS = str.maketrans({c: " " for c in ".()[],:;!*#{}"})
_YES_NO = re.compile(r"\b(yes|no)\b")
_PUNCTUATIONS = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
                 ",", "?", "!"]  # fmt: skip


def _process_punctuation(text: str) -> str:
    out = text
    for p in _PUNCTUATIONS:
        # Dropped when next to a space (or when the text holds a digit-comma-digit), else a word break.
        if p + " " in text or " " + p in text or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # EvalAI passes re.UNICODE (= 32) as the ``count`` argument: only the first 32 periods go.
    return _PERIOD_STRIP.sub("", out, count=re.UNICODE)


def _process_digit_article(text: str) -> str:
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_vqa_answer(text: str) -> str:
    """Normalises an answer the way EvalAI / lmms-eval do before VQA matching.

    Steps (in EvalAI's order): lower-case; delete "," and "?" (so "3,000" -> "3000"); "'s" -> " 's";
    newlines/tabs -> spaces; punctuation (";", "/", "-", "(", ...) deleted when next to a space, else
    replaced by a space ("t-shirt" -> "t shirt"); "." deleted unless followed by a digit ("yes." -> "yes",
    "1.5" kept); number words zero..ten (and "none") -> digits; articles a/an/the dropped; missing
    apostrophes restored ("dont" -> "don't"); white space folded.

    Args:
        text: Raw answer (a model prediction or a human reference answer).

    Returns:
        The normalised answer.
    """
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(text))


def extract_option_letter(text: str, letters: str = "ABCDEFGH") -> str | None:
    """Extracts a multiple-choice option letter ("B", "(B)", "B. cat", "The answer is B" -> "B").

    A lone letter (any case, with brackets/punctuation) is taken as is. Otherwise MMBench's
    ``can_infer_option`` rule applies: brackets and punctuation become spaces, and the answer is the
    option letter when exactly one distinct upper-case option letter occurs as a word.

    Args:
        text: Model answer.
        letters: The valid option letters.

    Returns:
        The upper-case letter, or None when no unique letter is found.
    """
    words = text.translate(_OPTION_SEPARATORS).split()
    if len(words) == 1 and len(words[0]) == 1 and words[0].upper() in letters:
        return words[0].upper()
    found = {w for w in words if len(w) == 1 and w in letters}
    return found.pop() if len(found) == 1 else None


def parse_mme_answer(text: str) -> str:
    """Maps an MME answer to "yes", "no" or "other" (lmms-eval's ``parse_pred_ans``).

    Lower-cased, stripped, periods removed; "yes"/"no" (or a lone "y"/"n") directly, else "yes" or "no"
    when contained in the first four characters ("yes" checked first), else "other".

    Args:
        text: Model answer.

    Returns:
        "yes", "no" or "other".
    """
    text = text.lower().strip().replace(".", "")
    if text in ("yes", "no"):
        return text
    if len(text) == 1:
        return {"y": "yes", "n": "no"}.get(text, "other")
    return "yes" if "yes" in text[:4] else "no" if "no" in text[:4] else "other"


def parse_pope_answer(text: str) -> str:
    """Maps a POPE answer to "yes", "no" or "other": the first word "yes"/"no" (lmms-eval).

    Text up to a closing ``</think>`` is dropped, the rest lower-cased and searched for the first whole
    word "yes" or "no" ("Yes, there is a dog." -> "yes").

    Args:
        text: Model answer.

    Returns:
        "yes", "no" or "other".
    """
    match = _YES_NO.search(text.rsplit("</think>", 1)[-1].lower())
    return match.group(1) if match else "other"

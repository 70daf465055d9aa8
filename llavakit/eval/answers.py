"""Turning free-text model answers into the form each benchmark's official rule compares.

Scope: the VQA answer normalisation (the VQA challenge's `vqaEval.py`, also LLaVA's
`EvalAIAnswerProcessor`, re-typed here as data because neither is an installable package), GQA's light
normalisation, POPE's and MME's yes/no readers, multiple-choice letter extraction, and reading a
`llavakit predict` answers file (model_vqa JSONL) keyed by question id.
"""
from __future__ import annotations

import re
from pathlib import Path

from llavakit import datafiles
from llavakit.scale.questions import ANSWERS_FORMAT

# The VQA challenge's contraction table, verbatim (its oddities included, e.g. "somebody'd" -> "somebodyd").
CONTRACTIONS = {
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
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
               ",", "?", "!")
_PERIOD_STRIP = re.compile(r"\.(?!\d)")  # a period survives only before a digit ("3.5")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def _process_punctuation(text: str) -> str:
    # Official quirk kept: when the text holds a digit-comma-digit ("1,000") or the mark touches a space,
    # every mark is deleted (so "1,000" -> "1000"); otherwise it becomes a space ("yes/no" -> "yes no").
    out = text
    delete = _COMMA_STRIP.search(text) is not None
    for p in PUNCTUATION:
        out = out.replace(p, "" if delete or p + " " in text or " " + p in text else " ")
    return _PERIOD_STRIP.sub("", out)


def _process_digit_article(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_vqa_answer(text: str) -> str:
    """The VQA challenge's answer normalisation, applied to predictions and ground truths alike.

    Newlines/tabs -> spaces; punctuation removed or spaced (commas inside numbers removed, a period kept
    only before a digit); lowercase; number words zero..ten -> digits; articles a/an/the dropped;
    contractions written without an apostrophe restored ("dont" -> "don't").
    """
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(text))


_GQA_PUNCT = re.compile(r"[^\w\s']")


def normalize_gqa_answer(text: str) -> str:
    """GQA's light normalisation: lowercase, punctuation -> space, articles dropped, spaces collapsed.

    LLaVA's GQA conversion only strips a trailing "." and lowercases before the official exact match;
    GQA's answers are single lowercase words or phrases, so this lighter rule adds no false matches
    while forgiving "The table." for "table".
    """
    words = _GQA_PUNCT.sub(" ", text.lower()).split()
    return " ".join(w for w in words if w not in ARTICLES)


def pope_yes_no(text: str) -> str:
    """LLaVA's POPE rule: keep the first sentence; "no"/"No"/"not" among its words -> "no", else "yes"."""
    first = text.split(".")[0].replace(",", "")
    words = first.split(" ")
    return "no" if {"No", "no", "not"} & set(words) else "yes"


def mme_yes_no(text: str) -> str:
    """MME's `parse_pred_ans`: "yes"/"no" exactly, else by the first four characters, else "other"."""
    ans = text.lower().strip().replace(".", "")
    if ans in ("yes", "no"):
        return ans
    if "yes" in ans[:4]:
        return "yes"
    return "no" if "no" in ans[:4] else "other"


# An upper-case letter may be followed by more words ("The answer is B because ..."); a lower-case one
# only by punctuation or the end, so that "the answer is a cat" names no letter.
_EXPLICIT = re.compile(r"(?i:answer)(?:\s+is)?\s*:?\s*"
                       r"(?:\(?([A-Z])\)?(?![A-Za-z])|\(([a-z])\)|([a-z])(?=\s*$|[.,;:!]))")
_PAREN = re.compile(r"\(([A-Z])\)")
_LEADING = re.compile(r"^\(?([A-Z])[).:](?:\s|$)")


def extract_choice(text: str, letters: str = "ABCDEFGH") -> str | None:
    """The option letter a free-text answer picks, or None when it names none or several.

    Rules, first that decides wins:
      1. the whole answer is one letter, maybe in parentheses or followed by "." ("B", "(b)", "B.");
      2. "answer is X" / "answer: X" (any case; X must not run into a word, so "answer is a cat" is
         no letter); several different such letters -> None;
      3. two or more different "(X)" labels -> None ("(A) or (B)");
      4. a leading option label "B. cat", "(B) cat", "B) cat", "B: cat";
      5. exactly one "(X)" label anywhere ("I pick (C)").
    Only letters in `letters` count; "A" starting a sentence ("A cat") is read as an article.
    """
    s = text.strip()
    bare = s.rstrip(".").strip("()").strip()
    if len(bare) == 1 and bare.upper() in letters and bare.isalpha():
        return bare.upper()
    explicit = {"".join(m).upper() for m in _EXPLICIT.findall(s)} & set(letters)
    if explicit:
        return explicit.pop() if len(explicit) == 1 else None
    parens = {m for m in _PAREN.findall(s) if m in letters}
    if len(parens) > 1:
        return None
    lead = _LEADING.match(s)
    if lead and lead.group(1) in letters:
        return lead.group(1)
    return parens.pop() if parens else None




def read_answers(path: str | Path) -> dict[str, str]:
    """A `llavakit predict` answers file as {str(question_id): text}; a repeated id keeps its last answer."""
    rows = datafiles.read_jsonl(path, ANSWERS_FORMAT)
    for row in rows:
        if "question_id" not in row or "text" not in row:
            raise ValueError(f"{row.where} has keys {sorted(row)}; expected 'question_id' and 'text' "
                             "(the model_vqa answers format written by `llavakit predict`)")
    return {str(row["question_id"]): row["text"] for row in rows}

"""Answer normalisation: the official VQA rule, the GQA exact-match rule, and a strict yes/no parse.

`vqa_normalize` follows the VQA challenge's evaluation (``vqaEval.py``, ``processPunctuation`` and
``processDigitArticle``; VizWiz and OK-VQA use the same code). Its rules, in order:

1. newline and tab become a space; surrounding whitespace is stripped;
2. punctuation, one mark at a time for ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` (not ``'``, ``:`` or ``.``):
   the mark is deleted everywhere when the *original* text has it next to a space (``"p "`` or ``" p"``) or contains a
   digit-comma-digit group such as ``"1,000"``; otherwise every occurrence becomes a space (``"yes!"`` -> ``"yes "``,
   ``"black/white"`` -> ``"black white"``, ``"1,000"`` -> ``"1000"``);
3. periods are deleted unless a digit follows, so decimals survive (``"2.5"`` kept, ``"yes."`` -> ``"yes"``). The
   official pattern ``(?!<=\\d)(\\.)(?!\\d)`` means to be a lookbehind but is written as a lookahead that always
   holds, so its effective rule is "not followed by a digit"; that effective rule is what is implemented here;
4. lower-case, split on whitespace; the number words zero..ten become digits and ``"none"`` becomes ``"0"``;
5. the articles ``a``, ``an``, ``the`` are dropped;
6. contractions written without an apostrophe get it back (``"dont"`` -> ``"don't"``), from the table below: the
   common entries of the official table. The official table's keys with capitals (``"Im"``, ``"Ive"``) never match
   after its own lower-casing, so they are left out here too (``"im"`` stays ``"im"``, as in the official output);
7. the words are joined with single spaces.

`gqa_normalize` is the exact-match rule lmms-eval uses for GQA (``exact_match`` with ``ignore_case`` and
``ignore_punctuation``: lower-case, every ``string.punctuation`` character deleted) plus the whitespace strip and the
SQuAD-style dropping of articles, so "The table." matches "table". Both sides of a comparison get it, so a reference
that carries an article still matches itself.

`first_word_yes_no` is a strict parse: the first whitespace-separated word, lower-cased and stripped of surrounding
punctuation, must be one of the yes or no words; anything else is unparsed (``None``), never guessed.

`pope_yes_no` is POPE's own rule (its ``evaluate.py``, also LLaVA's ``eval_pope.py``): "no" when the first sentence
holds the word No, no or not, "yes" otherwise; it parses every answer.
"""

from __future__ import annotations

import re
import string
from typing import Optional, Sequence

# --- the official VQA normalisation ---------------------------------------------------------------------------------

VQA_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                   "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")

NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = frozenset({"a", "an", "the"})

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldnt": "couldn't", "couldve": "could've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't",
    "havent": "haven't", "hes": "he's", "isnt": "isn't", "itll": "it'll", "maam": "ma'am", "mightnt": "mightn't",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "oclock": "o'clock",
    "shant": "shan't", "shouldnt": "shouldn't", "shouldve": "should've", "thats": "that's", "theres": "there's",
    "theyd": "they'd", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "wasnt": "wasn't",
    "werent": "weren't", "weve": "we've", "whats": "what's", "wheres": "where's", "whos": "who's", "wont": "won't",
    "wouldnt": "wouldn't", "wouldve": "would've", "yall": "y'all", "youd": "you'd", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
"""Apostrophe-less spelling -> the spelling the VQA references use (a subset of the official table, straight quotes)."""


def _vqa_punctuation(text: str) -> str:
    """Rules 2 and 3: each mark deleted or turned into a space (decided on the original text), then the periods."""
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in VQA_PUNCTUATION:
        if delete_all or (mark + " ") in text or (" " + mark) in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out)


def _vqa_words(text: str) -> str:
    """Rules 4-7: lower-case, number words to digits, articles dropped, contractions restored, single spaces."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def vqa_normalize(text: str) -> str:
    """The official VQA answer normalisation (rules 1-7 of the module docstring): ``"Two."`` -> ``"2"``."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _vqa_words(_vqa_punctuation(text))


# --- GQA exact match ------------------------------------------------------------------------------------------------

_DELETE_PUNCTUATION = str.maketrans("", "", string.punctuation)


def gqa_normalize(text: str) -> str:
    """Lower-case, ``string.punctuation`` deleted, articles dropped, spaces collapsed: "The Table." -> "table"."""
    words = text.lower().translate(_DELETE_PUNCTUATION).split()
    return " ".join(word for word in words if word not in ARTICLES)


# --- strict yes / no ------------------------------------------------------------------------------------------------

def first_word_yes_no(text: str, yes: Sequence[str] = ("yes",), no: Sequence[str] = ("no",)) -> Optional[bool]:
    """True when the first word is a yes word, False when a no word, None otherwise (or for an empty text).

    ``"Yes, it is."`` -> True; ``"no."`` -> False; ``"I think yes"`` -> None; ``"nope"`` -> None. With
    ``yes=("true",), no=("false",)`` it parses a true/false answer the same way. Words compare lower-cased.
    """
    words = text.lower().split()
    if not words:
        return None
    first = words[0].strip(string.punctuation)
    if first in {w.lower() for w in yes}:
        return True
    if first in {w.lower() for w in no}:
        return False
    return None


def pope_yes_no(text: str) -> bool:
    """POPE's own yes / no rule (github.com/AoiDragon/POPE ``evaluate.py``, also LLaVA's ``eval_pope.py``): False ("no")
    when a word of the first sentence is exactly ``No``, ``no`` or ``not``, True ("yes") otherwise, so every answer
    parses (an empty or garbled one is a "yes").

    As the original: only the text before the first ``.`` is kept, commas are deleted, and the rest is split on single
    spaces (``text.split(' ')``, not on any whitespace); the words compare case-sensitively, with no other punctuation
    stripped (``"No!"`` is not a no word, ``"NO"`` neither). ``"There is no dog."`` -> False; ``"Not that I can see"``
    -> True (``Not`` is not in the list); ``"No, there is not."`` -> False; ``"There is a dog. It is not red."`` ->
    True.
    """
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return not ("No" in words or "not" in words or "no" in words)

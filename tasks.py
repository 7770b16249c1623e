"""Task definitions for llm2llm: loading, prompts, answer checking, teacher replies and their filtering.

A task knows how to
  - load its train/test rows from JSONL (fetching public data on first use),
  - turn a row into the student's user message (`prompt`) and training target (`response`),
  - read the student's answer out of generated text (`extract`) and grade it (`is_correct`),
  - ask the teacher for new examples built from a wrong seed row (`teacher_messages`, prompts/*.txt),
  - read the teacher's untrusted reply back into rows (`parse_reply`) and vet them (`validate`,
    `filter_generated`: duplicates, near-duplicates, test-set overlap, wrong arithmetic).

Built-in tasks (files DATA_DIR/<task>/{train,test}.jsonl, one JSON object per line):
  gsm8k     question, answer (rationale with <<a*b=c>> notes, last line "#### N")    answer_type number
  sst2      text, label in {negative, positive}                                       answer_type label
  trec      text, label in {ABBR, DESC, ENTY, HUM, LOC, NUM} (fine_label optional)    answer_type label
  snips     text, label (7 intents)                                                   answer_type label
  casehold  citing_prompt, holding_0..holding_4, label (0-4, int or str)              answer_type label
A user's own task: get_task("path/train.jsonl", test_file="path/test.jsonl", answer_type=...), rows
{"input": ..., "output": ...}; answer_type "exact" (normalized string match), "number" (numeric match) or
"label" (labels taken from the train file's outputs unless `labels` is given).

Usage:
    import tasks
    task = tasks.get_task("gsm8k")
    train = task.load("train", "data")
    seed = tasks.sample_seed(task, train, size=100, seed=0)
    task.is_correct("... so she has $1,200.\n#### 1200", seed[0])
"""

import json
import math
import os
import random
import re
from dataclasses import dataclass, field
from fractions import Fraction
from functools import lru_cache
from pathlib import Path

import requests
from tqdm import tqdm

PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"


class TaskError(Exception):
    """A problem the user can fix (bad file, bad option); the message says where and what to do."""


# ----------------------------------------------------------------------------------------------------------
# Numbers. GSM8K answers are compared as exact rationals: "1,200" == 1200, "3.0" == 3, "1/2" is one half (not
# 12), "$-5" and "-5" are negative. Floats would make 0.1+0.2 != 0.3 and string compare would make 3.0 != 3.

NUMBER_RE = re.compile(
    r"(?<![\w.])"                              # not the tail of a word or a decimal
    r"(?P<neg>[-\u2212]\s?)?\$?\s?(?P<neg2>[-\u2212])?"
    r"(?P<int>\d{1,3}(?:,\d{3})+(?!\d)|\d+|(?=\.\d))"  # 1,200 (thousands groups), 1200, or none in .5
    r"(?P<dec>\.\d+)?"
    r"(?:\s?/\s?(?P<den>\d+)(?![\d.]))?"       # a fraction a/b
)


def _number_value(match):
    value = Fraction(match["int"].replace(",", "") + (match["dec"] or ""))
    if match["den"] and int(match["den"]) != 0:
        value /= int(match["den"])
    # "-" is a sign only where no digit (or closing parenthesis) precedes it: "20 - 18" is a subtraction, not -18
    negative = (match["neg"] or match["neg2"]) and not re.search(r"[\d)]\s*$", match.string[:match.start()])
    return -value if negative else value


def parse_number(text):
    """The first number in `text` as a Fraction, or None."""
    match = NUMBER_RE.search(str(text))
    return _number_value(match) if match else None


def format_number(value):
    """Canonical text of a Fraction: "1200", "0.5", "-2.25", "1/3"."""
    if value.denominator == 1:
        return str(value.numerator)
    den = value.denominator
    while den % 2 == 0:
        den //= 2
    while den % 5 == 0:
        den //= 5
    if den != 1:
        return f"{value.numerator}/{value.denominator}"
    digits = 0
    while (value * 10**digits).denominator != 1:
        digits += 1
    scaled = str(abs(value * 10**digits).numerator).rjust(digits + 1, "0")
    return f"{'-' if value < 0 else ''}{scaled[:-digits]}.{scaled[-digits:]}"


# Grading is strict, and the same for gold answers, seed evaluation and test evaluation. A GSM8K answer is the
# number on its FIRST "####" line: a student that runs on after its answer ("#### 18\n\nQuestion: ... #### 7") is
# graded on what it answered first, and one cut off before any "####" is wrong, not graded on whatever number it
# last wrote. Without "####" (a user's own number task) the answer is the only number in it, or the number that
# opens it when its first sentence holds no other ("Answer: 42. Since 40 + 2 = 42"); "3 or 4" and "2+2 = 4" are wrong.

def extract_number(text):
    """The first number on the first "####" line, or None (no "####", or no number on that line)."""
    text = str(text)
    marker = text.find("####")
    if marker < 0:
        return None
    match = NUMBER_RE.search(text[marker + 4:].split("\n", 1)[0])
    return _number_value(match) if match else None


ANSWER_PREFIX_RE = re.compile(r"^[\s*_#>`-]*(?:[^\W\d][^:\n]{0,40}:)?[\s*_`]*")  # "**Answer:** ", "Label: "
SENTENCE_END_RE = re.compile(r"\n|[.!;](?=\s|$)")  # "4.5" and "U.S.C." do not end one; "?" commits to nothing


def answer_number(text):
    """The "####" number if there is a "####", else the only number in the answer, or the number that opens it
    when its first sentence holds no other ("Answer: 42. Since 40 + 2 = 42" but not "3 or 4"); else None."""
    text = str(text)
    if "####" in text:
        return extract_number(text)
    values = {_number_value(m) for m in NUMBER_RE.finditer(text)}
    if len(values) == 1:
        return values.pop()
    first_sentence = SENTENCE_END_RE.split(text[ANSWER_PREFIX_RE.match(text).end():], maxsplit=1)[0]
    opening = NUMBER_RE.match(first_sentence)
    if opening and {_number_value(m) for m in NUMBER_RE.finditer(first_sentence)} == {_number_value(opening)}:
        return _number_value(opening)
    return None


# ----------------------------------------------------------------------------------------------------------
# Labels and exact strings. Students and teachers write "Positive.", "**NUM**", "Play Music", "add to play list",
# "add_to_playlist", "holding_2": comparing runs of lowercase alphanumeric words, joined, against each label with
# its case, spaces, underscores and punctuation removed makes all of these match, without accepting a word that is
# merely similar ("positively" is not "positive").
#
# An answer counts as a label only when it commits to one. It names exactly one label, not counting a label
# directly after a negation ("not positive", "isn't DESC", "non-negative"), so "The sentiment is not positive; it
# is negative." is negative; or it opens with the label (after an optional "Answer:"-style prefix) and its first
# sentence names no other ("NUM. A DESC question would ask why."). Hedges and lists ("negative or positive",
# "DESC or NUM", "DESC/NUM") name two labels and open with neither alone: wrong.

NEGATIONS = {"not", "no", "never", "neither", "nor", "non", "t", "cannot", "without", "nothing"}  # "isn't": "isn" "t"
# words a negation reaches across to the label it negates: "does not express a negative opinion", "isn't entirely
# positive". Anything else ("not bad but negative") ends its reach
NEGATION_FILLERS = {"a", "an", "the", "any", "very", "really", "entirely", "overly", "particularly", "purely",
                    "clearly", "explicitly", "express", "expresses", "convey", "conveys", "state", "states", "seem",
                    "seems", "be", "is", "at", "all"}
LIST_WORDS = {"or", "nor", "and"}


def _words(text):
    return re.findall(r"[a-z0-9]+", str(text).lower())


def _label_key(label):
    return "".join(_words(label))


def label_mentions(text, labels):
    """[(label, word index, negated)] for each label named in `text`, in order (case, spacing, punctuation ignored)."""
    keys = {_label_key(label): label for label in labels if _label_key(label)}
    longest = max(map(len, keys), default=0)
    words, found, start, end_of_last = _words(text), [], 0, 0
    while start < len(words):
        joined, end, match = "", start, None
        while end < len(words) and len(joined) + len(words[end]) <= longest:  # "add to play list": 4 words
            joined += words[end]
            end += 1
            if joined in keys:
                match = end
        if match:
            # a negation reaches along a list of labels: "not ENTY or NUM", "neither HUM nor LOC"
            listed = bool(found) and found[-1][2] and all(w in LIST_WORDS for w in words[end_of_last:start])
            found.append((keys["".join(words[start:match])], start, listed or _negated(words, start)))
            end_of_last = match
        start = match or start + 1
    return found


def _negated(words, start):
    """Whether a negation governs the word at `start`: it stands right before it, or before up to three fillers."""
    for back in range(start - 1, max(start - 5, -1), -1):
        if words[back] in NEGATIONS:
            return True
        if words[back] not in NEGATION_FILLERS:
            return False
    return False


def labels_in(text, labels):
    """The labels named in `text`, in order of appearance, negated or not."""
    return [label for label, _, _ in label_mentions(text, labels)]


def _named(mentions):
    return {label for label, _, negated in mentions if not negated}


def match_label(text, labels, distractors=()):
    """The one label the answer commits to, or None (see above): "Sentiment: **Positive**." -> "positive".
    distractors: answers that are not labels ("neutral" for a positive/negative task). They compete with the labels,
    so "The sentiment is neutral. It does not express a negative opinion." commits to neutral: no label."""
    answer = _committed_label(text, list(labels) + list(distractors))
    if answer in distractors:
        return None
    # a label list split over lines ("HUM" then "LOC" on the next line) is a list, and a list is wrong: a line after
    # the first that names a label may name no other label than the answer (negated mentions aside)
    lines = [line for line in str(text).splitlines() if _named(label_mentions(line, labels))]
    if answer is not None and any(_named(label_mentions(line, labels)) - {answer} for line in lines[1:]):
        return None
    return answer


def _committed_label(text, labels):
    named = _named(label_mentions(text, labels))
    if len(named) == 1:
        return named.pop()
    text = str(text)
    body = text[ANSWER_PREFIX_RE.match(text).end():]
    if _named(label_mentions(text[:len(text) - len(body)], labels)):  # no prefix but an answer: "positive: it ..."
        body = text
    first_sentence = SENTENCE_END_RE.split(body.strip(), maxsplit=1)[0]
    mentions = label_mentions(first_sentence, labels)
    if mentions and mentions[0][1] == 0 and _named(mentions) == {mentions[0][0]}:
        return mentions[0][0]
    return None


def canonical_label(value, labels):
    """The label that `value` spells as a whole ("Positive." -> "positive", 2 -> "2"), or None."""
    return next((label for label in labels if _label_key(label) == _label_key(value)), None)


def normalize_text(text):
    """Case-folded, whitespace-collapsed, with surrounding quotes and end punctuation removed."""
    return " ".join(str(text).casefold().split()).strip(" \"'`*.,;:!?")


# ----------------------------------------------------------------------------------------------------------
# GSM8K calculator notes. A teacher that writes "<<12*3=38>>" teaches wrong arithmetic, so every note is
# recomputed. The text is untrusted: a tiny recursive-descent parser that knows numbers, + - * / % and
# parentheses, and nothing else, does the arithmetic (no eval, no ast on arbitrary code).

NOTE_RE = re.compile(r"<<(.*?)>>", re.S)
# a GSM8K answer must show working before its "####" line: a calculator note, an "=", or an operation on numbers
WORKING_RE = re.compile(r"<<|=|\d\s*[-+*/\u00d7\u00f7x]\s*\$?\d")
NOTE_TOKEN_RE = re.compile(r"\s*(?:(\d+(?:\.\d*)?|\.\d+)|(//|.))")


def safe_arithmetic(expr):
    """Evaluate + - * / // % ( ) over numbers exactly (Fraction); ValueError on anything else."""
    if len(expr) > 200:
        raise ValueError("expression too long")
    expr = re.sub(r"(?<=\d),(?=\d{3})", "", expr).replace("$", "")
    expr = expr.replace("\u00d7", "*").replace("x", "*").replace("X", "*").replace("\u00f7", "/")
    tokens = [num or op for num, op in NOTE_TOKEN_RE.findall(expr) if num or op.strip()]
    pos = 0

    def peek():
        return tokens[pos] if pos < len(tokens) else None

    def take():
        nonlocal pos
        pos += 1
        return tokens[pos - 1]

    def sum_():
        value = product()
        while peek() in ("+", "-"):
            value = value + product() if take() == "+" else value - product()
        return value

    def product():
        value = unary()
        while peek() in ("*", "/", "//"):
            op = take()
            if op == "*":
                value *= unary()
                continue
            divisor = unary()
            if divisor == 0:
                raise ValueError("division by zero")
            value = value / divisor if op == "/" else Fraction(value // divisor)
        return value

    def unary():
        if peek() in ("+", "-"):
            return unary() if take() == "+" else -unary()
        token = take() if peek() is not None else None
        if token == "(":
            value = sum_()
            if peek() != ")":
                raise ValueError("missing )")
            take()
        elif token is not None and token[0] in "0123456789.":
            value = Fraction(token)
        else:
            raise ValueError(f"unexpected {token!r}")
        if peek() == "%":
            take()
            value /= 100
        return value

    value = sum_()
    if pos != len(tokens):
        raise ValueError(f"unexpected {tokens[pos]!r}")
    return value


def check_calculations(rationale):
    """None if every <<expression=result>> note is right (up to the rounding the result shows), else a reason."""
    for note in NOTE_RE.findall(rationale):
        expr, sep, result = note.rpartition("=")
        result_value = parse_number(result)
        if not sep or result_value is None or NUMBER_RE.sub("", result).strip(" %"):
            return "bad_calculation"
        try:
            value = safe_arithmetic(expr)
        except (ValueError, ZeroDivisionError):
            return "bad_calculation"
        # "10/3=3.33" and "1/3=0.33" are fine: the result may differ from the exact value by at most half a unit
        # of its last shown digit, as a rounded result does. "0.5+0.4=0", "2.6+0.3=2" and "12*3=38" are not.
        decimals = len(result.split(".")[1].strip(" %")) if "." in result else 0
        if abs(value - result_value) > Fraction(1, 2 * 10**decimals):
            return "bad_calculation"
    return None


# ----------------------------------------------------------------------------------------------------------
# Prompt files (format in prompts/README.md). Substitution is a single regex pass over known names, so a
# value containing "{n}" or "{0.__class__}" is inserted verbatim and nothing is ever formatted or evaluated.

SECTION_RE = re.compile(r"^### (system|user|student)[ \t]*$", re.M)


@lru_cache(maxsize=None)
def read_prompt_file(path):
    text = Path(path).read_text(encoding="utf-8")
    parts = SECTION_RE.split(text)
    sections = {name: body.strip("\n") for name, body in zip(parts[1::2], parts[2::2])}
    if "system" not in sections or "user" not in sections:
        raise TaskError(f"{path}: needs a '### system' and a '### user' section (see prompts/README.md)")
    return sections


def fill(template, values, source):
    def replace(match):
        if match[1] not in values:
            raise TaskError(f"{source}: unknown placeholder {{{match[1]}}}; known: {', '.join(sorted(values))}")
        return str(values[match[1]])

    return re.sub(r"\{([a-z_0-9]+)\}", replace, template)


# ----------------------------------------------------------------------------------------------------------
# Teacher replies. Items are numbered "Key: value" blocks; real replies add preambles ("Sure! Here are..."),
# markdown ("**1.** **Question:**", "### Question 2" on a line of its own), "### Example 2" headers and closing
# chatter. An item starts at each line opening with the first key; other keys are looked up inside the item; a
# value runs to the next key (a question may have two paragraphs), and nothing outside a recognised key is used.

def _key_re(key):
    number = r"(?:(?:(?:example|problem|item)[ \t]*)?\d{1,3}[ \t]*[.):][*_ \t]*)?"  # "1.", "**1.** ", "Problem 2:"
    name = re.escape(key).replace(r"\ ", r"[ _]?") + r"(?:[ \t]*\d{1,3})?[*_ \t]*"    # "Question", "Question 2**"
    return re.compile(
        r"^[ \t>#*_-]*" + number + name + r":[ \t]*[*_]*[ \t]*"                      # "**1.** **Question:** "
        + r"|^[ \t]*(?:#{1,6}|[*_]{2})[ \t]*" + number + name + r":?[*_ \t]*\n",    # "### Question 2" alone
        re.I | re.M,
    )


def split_items(text, keys):
    """[({key: value}, raw item text, last key)] per item; a key missing from an item is missing from its dict."""
    text = str(text).replace("\r\n", "\n").replace("\r", "\n")
    starts = [m.start() for m in _key_re(keys[0]).finditer(text)]
    items = []
    for begin, end in zip(starts, starts[1:] + [len(text)]):
        chunk = text[begin:end]
        found = sorted(
            ((m.start(), m.end(), key) for key in keys for m in [_key_re(key).search(chunk)] if m),
        )
        item = {}
        for (start, value_start, key), nxt in zip(found, found[1:] + [(len(chunk), 0, None)]):
            if key not in item:
                item[key] = chunk[value_start:nxt[0]].replace("**", "").strip()
        items.append((item, chunk.strip(), found[-1][2]))
    return items


# ----------------------------------------------------------------------------------------------------------
# The task. One dataclass holds what differs between tasks (fields, templates, label set); the methods are
# shared, and differ only by answer_type.

@dataclass
class Task:
    name: str
    answer_type: str                      # "number" | "label" | "exact"
    labels: list | None
    input_fields: tuple                   # native fields shown to the student; the first is its main text
    target_field: str                     # native field holding the answer
    instruction: str                      # user message, {field} placeholders
    reply_keys: tuple                     # (("Question", "question"), ...) teacher reply key -> native field
    prompt_file: str                      # prompts/<name>.txt
    rationale: bool = False               # target is a worked solution ending in "#### N" (gsm8k)
    marker: tuple = ()                    # (field, text) a generated row must contain exactly once (casehold)
    distractors: tuple = ()               # answers that are no label, e.g. "neutral" for sst2 (see match_label)
    files: dict = field(default_factory=dict)   # split -> path, for a user's own task

    # --- data -----------------------------------------------------------------------------------------
    def path(self, split, data_dir):
        if self.files:
            if split not in self.files or not self.files[split]:
                raise TaskError(f"task {self.name}: no {split} file given (pass --test-file for the test split)")
            return Path(self.files[split])
        return Path(data_dir) / self.name / f"{split}.jsonl"

    def load(self, split, data_dir="data"):
        """Rows of `split` with "id" = "{name}-{split}-{line_index}" (0-based line index in the file)."""
        path = self.path(split, data_dir)
        if not path.exists():
            if self.files:
                raise TaskError(f"{path}: file not found")
            fetch(self, split, path)
        rows = []
        with open(path, encoding="utf-8") as f:
            for index, line in enumerate(f):
                if not line.strip():
                    continue
                where = f"{path}:{index + 1}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise TaskError(f"{where}: not valid JSON ({e.msg}); each line must be one JSON object") from None
                if not isinstance(row, dict):
                    raise TaskError(f"{where}: expected a JSON object, got {type(row).__name__}")
                problem = self.validate_fields(row)
                if problem:
                    raise TaskError(f"{where}: {problem}; fix or delete this line")
                row["id"] = f"{self.name}-{split}-{index}"
                rows.append(row)
        if not rows:
            raise TaskError(f"{path}: no rows; expected one JSON object per line with {self.field_names()}")
        return rows

    def fields(self):
        """The native fields every row needs, in order."""
        return tuple(dict.fromkeys(self.input_fields + (self.target_field,)))

    def field_names(self):
        return ", ".join(self.fields())

    def validate_fields(self, row):
        """A user-facing description of what is wrong with a loaded row, or None."""
        for name in self.fields():
            value = row.get(name)
            if value is None or (isinstance(value, str) and not value.strip()):
                return f"missing field {name!r} (need {self.field_names()})"
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                return f"field {name!r} must be a string, got {type(value).__name__}"
        if self.answer_type == "number" and self.answer_value(row) is None:
            return f"{self.target_field!r} has no number" + (" on its '####' line" if self.rationale else
                                                              " (write it first, as the only one, or after '####')")
        if self.answer_type == "label" and canonical_label(row[self.target_field], self.labels) is None:
            return f"label {row[self.target_field]!r} is not one of {self.labels}"
        return None

    # --- student side -----------------------------------------------------------------------------------
    def prompt(self, row):
        return fill(self.instruction, {**{k: row.get(k, "") for k in self.input_fields}, "labels": self.label_text()},
                    f"instruction of task {self.name}")

    def response(self, row):
        return self.gold(row) if self.answer_type == "label" else str(row[self.target_field]).strip()

    def answer_value(self, row):
        """The number a gold or generated row answers, read exactly as a student's answer is (None if none)."""
        return self.read_number(row[self.target_field])

    def read_number(self, text):
        # a rationale (gsm8k) must state its answer on a "####" line; other number tasks may also answer plainly
        return extract_number(text) if self.rationale else answer_number(text)

    def gold(self, row):
        if self.answer_type == "number":
            return format_number(self.answer_value(row))
        if self.answer_type == "label":
            return canonical_label(row[self.target_field], self.labels) or str(row[self.target_field])
        return str(row[self.target_field]).strip()

    def extract(self, text):
        if self.answer_type == "number":
            value = self.read_number(text)
            return None if value is None else format_number(value)
        if self.answer_type == "label":
            return match_label(text, self.labels, self.distractors)
        text = re.sub(r"^\s*(?:\*\*)?(?:final )?(?:answer|output)(?:\*\*)?\s*:\s*", "", str(text), flags=re.I)
        return text.strip() or None

    def is_correct(self, text, row):
        if self.answer_type == "number":
            value = self.read_number(text)
            return value is not None and value == self.answer_value(row)
        answer = self.extract(text)
        if answer is None:
            return False
        if self.answer_type == "label":
            return answer == self.gold(row)
        return normalize_text(answer) == normalize_text(self.gold(row))

    def stratify_key(self, row):
        return self.gold(row) if self.answer_type == "label" else None

    def label_text(self):
        return ", ".join(self.labels or [])

    # --- teacher side -----------------------------------------------------------------------------------
    def format_item(self, row):
        """A row in the teacher's reply format (without the item number)."""
        lines = []
        for key, name in self.reply_keys:
            value = self.gold(row) if name == self.target_field and self.answer_type == "label" else row.get(name, "")
            lines.append(f"{key}: {str(value).strip()}")
        return "\n".join(lines)

    def teacher_messages(self, row, n, student_answer=None):
        path = PROMPTS_DIR / self.prompt_file
        if not path.exists():
            raise TaskError(f"{path}: prompt file missing; restore it from the repository")
        sections = read_prompt_file(str(path))
        values = {k: v for k, v in row.items() if isinstance(v, (str, int, float))}
        values.update(n=n, example=self.format_item(row), labels=self.label_text(), gold=self.gold(row),
                      student_answer="" if student_answer is None else student_answer)
        user = fill(sections["user"], values, path)
        if student_answer is not None and sections.get("student"):
            user += "\n\n" + fill(sections["student"], values, path)
        return [{"role": "system", "content": fill(sections["system"], values, path)},
                {"role": "user", "content": user}]

    def parse_reply(self, text, truncated=False):
        """(rows in native format, [(reason, raw text)]) from a teacher reply; structure only, see validate()."""
        keys = [key for key, _ in self.reply_keys]
        items = split_items(text, keys)
        rows, rejected = [], []
        if not items:
            return [], ([("unparseable", str(text).strip())] if str(text).strip() else [])
        if truncated:  # generation hit max_tokens: the last item is cut off mid-way
            rejected.append(("truncated", items.pop()[1]))
        for item, raw, last_key in items:
            if any(not item.get(key) for key in keys):
                rejected.append(("missing_field", raw))
                continue
            row = {}
            for key, name in self.reply_keys:
                value = item[key]
                # the last field of an item also holds what comes before the next item (chatter, "### Problem 3"):
                # a rationale ends at its first "####" line, a label is one line, any other last field one paragraph
                if self.rationale and name == self.target_field:
                    value = re.sub(r"(?m)^[ \t]*####", "####", value)
                    final = re.search(r"####[^\n]*", value)
                    value = value[:final.end()] if final else value
                elif name == self.target_field and self.answer_type == "label":
                    value = value.split("\n")[0].strip()
                    value = canonical_label(value, self.labels) or match_label(value, self.labels) or value
                elif key == last_key:
                    value = value.split("\n\n")[0].strip()
                row[name] = value
            rows.append(row)
        return rows, rejected

    def validate(self, row):
        """A short rejection reason for a generated row, or None if it is usable."""
        for name in self.fields():
            if not str(row.get(name, "")).strip():
                return "missing_field"
        if self.answer_type == "number" and self.answer_value(row) is None:
            return "not_a_number"
        if self.answer_type == "label" and str(row[self.target_field]) not in self.labels:
            return "bad_label"
        if self.marker and str(row[self.marker[0]]).count(self.marker[1]) != 1:
            return "bad_marker"
        if self.rationale:
            if not WORKING_RE.search(str(row[self.target_field]).split("####")[0]):
                return "no_working"
            return check_calculations(str(row[self.target_field]))
        return None


    # --- solutions (--teacher-mode solutions) ------------------------------------------------------------
    # The teacher solves a seed problem itself; its solution becomes a training target for the same question.
    # Only tasks whose answer can carry reasoning (a number, or an exact string) have solutions to sample.
    def supports_solutions(self):
        return self.answer_type != "label"

    def solve_messages(self, row):
        """The messages asking the teacher to solve `row` (its gold answer is never shown)."""
        path = PROMPTS_DIR / self.prompt_file.replace(".txt", "_solve.txt")
        if not path.exists():
            raise TaskError(f"{path}: prompt file missing; restore it from the repository")
        sections = read_prompt_file(str(path))
        values = {k: row.get(k, "") for k in self.input_fields}
        values.update(problem=self.prompt(row), labels=self.label_text())
        return [{"role": "system", "content": fill(sections["system"], values, path)},
                {"role": "user", "content": fill(sections["user"], values, path)}]

    def parse_solution(self, text, truncated=False):
        """(solution text, None) from a teacher's reply, or (raw text, reason). A GSM8K solution ends at its first
        "####" line; an opening "Solution:" or "Answer:" is dropped."""
        text = re.sub(r"^\s*(?:\*\*)?(?:solution|answer)(?:\*\*)?\s*:\s*(?:\*\*)?\s*", "", str(text),
                      flags=re.I).strip()
        if self.rationale:
            text = re.sub(r"(?m)^[ \t]*####", "####", text)
            final = re.search(r"####[^\n]*", text)
            if final and not (truncated and final.end() == len(text)):  # "#### 12" cut to "#### 1" is no answer
                return text[:final.end()].strip(), None
        if not text:
            return text, "empty"
        if truncated:  # cut off by max_tokens before its answer
            return text, "truncated"
        return text, None

    def check_solution(self, text, row):
        """None if the solution answers `row` correctly with sound-looking working, else a short reason:
        wrong_answer, no_working (GSM8K: nothing before "####"), bad_calculation (a wrong <<a*b=c>> note)."""
        if not self.is_correct(text, row):
            return "wrong_answer"
        if self.rationale and not WORKING_RE.search(text.split("####")[0]):
            return "no_working"
        return check_calculations(text)


def solution_key(text):
    """A solution with its whitespace collapsed and every number written canonically ("1,000" -> "1000",
    "3.50" -> "3.5", "$4" -> "4"): two solutions with the same key are duplicates."""
    text = NUMBER_RE.sub(lambda m: " " * m[0][:1].isspace() + format_number(_number_value(m)), str(text))
    return " ".join(text.split())


# ----------------------------------------------------------------------------------------------------------
# The built-in tasks.

def _classification(name, labels, instruction, distractors=()):
    return Task(name=name, answer_type="label", labels=labels, input_fields=("text",), target_field="label",
                instruction=instruction, reply_keys=(("Text", "text"), ("Label", "label")),
                prompt_file=f"{name}.txt", distractors=distractors)


SNIPS_LABELS = ["AddToPlaylist", "BookRestaurant", "GetWeather", "PlayMusic", "RateBook", "SearchCreativeWork",
                "SearchScreeningEvent"]
CASEHOLD_INSTRUCTION = ("Which holding fits the <HOLDING> in this citing text? Answer with its number (0-4).\n\n"
                        "{citing_prompt}\n\n" + "\n".join(f"({i}) {{holding_{i}}}" for i in range(5)))

TASKS = {
    "gsm8k": Task(name="gsm8k", answer_type="number", labels=None, input_fields=("question",),
                  target_field="answer", instruction="{question}", rationale=True,
                  reply_keys=(("Question", "question"), ("Answer", "answer")), prompt_file="gsm8k.txt"),
    "sst2": _classification("sst2", ["negative", "positive"],
                            "Is the sentiment of this movie review negative or positive?\n\n{text}",
                            distractors=("neutral", "mixed")),
    "trec": _classification("trec", ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"],
                            "Classify the type of answer this question asks for: ABBR (abbreviation), "
                            "DESC (description), ENTY (entity), HUM (human), LOC (location) or NUM (numeric)."
                            "\n\n{text}"),
    "snips": _classification("snips", SNIPS_LABELS, "Classify the intent of this request as one of {labels}."
                             "\n\n{text}"),
    "casehold": Task(name="casehold", answer_type="label", labels=["0", "1", "2", "3", "4"],
                     input_fields=("citing_prompt",) + tuple(f"holding_{i}" for i in range(5)),
                     target_field="label", instruction=CASEHOLD_INSTRUCTION,
                     reply_keys=(("Citing prompt", "citing_prompt"),)
                     + tuple((f"Holding {i}", f"holding_{i}") for i in range(5)) + (("Answer", "label"),),
                     prompt_file="casehold.txt", marker=("citing_prompt", "<HOLDING>")),
}
KNOWN = sorted(TASKS)


def get_task(name_or_path, test_file=None, answer_type="exact", labels=None):
    """A built-in task by name, or a user's own task from a JSONL train file of {"input", "output"} rows.

    A user's own task: `test_file` is its test split (another JSONL file of the same shape); answer_type is
    "exact" (outputs compared after case/space/punctuation normalization), "number" (the number on the first
    "####" line, else the only number or the one that opens the answer, compared numerically) or "label" (the one
    label the answer commits to; labels are the distinct outputs of the train file unless `labels` is given).
    """
    if name_or_path in TASKS:
        return TASKS[name_or_path]
    path = Path(name_or_path)
    if path.suffix != ".jsonl":
        raise TaskError(f"unknown task {name_or_path!r}: use one of {', '.join(KNOWN)}, "
                        f"or a path to your own train .jsonl file with {{\"input\": ..., \"output\": ...}} rows")
    if not path.exists():
        raise TaskError(f"{path}: file not found (a user's own task needs an existing train .jsonl file)")
    if answer_type not in ("exact", "number", "label"):
        raise TaskError(f"answer type {answer_type!r} is not one of exact, number, label")
    name = re.sub(r"[^A-Za-z0-9_]+", "_", path.stem if path.stem not in ("train", "test") else path.parent.name)
    # label tasks without a given label set read the train outputs first (as exact), then become label tasks
    read_labels = answer_type == "label" and not labels
    task = Task(name=name or "custom", answer_type="exact" if read_labels else answer_type,
                labels=[str(label) for label in labels] if labels else None, input_fields=("input",),
                target_field="output", instruction="{input}", reply_keys=(("Input", "input"), ("Output", "output")),
                prompt_file="custom.txt", files={"train": str(path), "test": str(test_file) if test_file else None})
    if read_labels:
        task.answer_type, task.labels = "label", sorted({str(row["output"]).strip() for row in task.load("train")})
    return task


# ----------------------------------------------------------------------------------------------------------
# Fetching public data on first use. Converted to the JSONL layout above and written atomically (temporary
# file + rename) so an interrupted download never leaves a half file that later loads as a short dataset.

RAW = "https://raw.githubusercontent.com"
SOURCES = {
    "gsm8k": {s: [f"{RAW}/openai/grade-school-math/master/grade_school_math/data/{s}.jsonl"]
              for s in ("train", "test")},
    # GLUE SST-2: its validation set serves as the test set (GLUE's test labels are private).
    "sst2": {"train": [f"{RAW}/forest-snow/alps/master/data/SST-2/train.tsv"],
             "test": [f"{RAW}/forest-snow/alps/master/data/SST-2/test.tsv"]},
    "trec": {s: [f"{RAW}/harvardnlp/sent-conv-torch/master/data/raw/TREC.{s}.all"] for s in ("train", "test")},
    "snips": {s: [f"{RAW}/MiuLab/SlotGated-SLU/master/data/snips/{s}/seq.in",
                  f"{RAW}/MiuLab/SlotGated-SLU/master/data/snips/{s}/label"] for s in ("train", "test")},
}


def convert_gsm8k(texts):
    rows = [json.loads(line) for line in texts[0].splitlines() if line.strip()]
    return [{"question": r["question"], "answer": r["answer"]} for r in rows]


def convert_sst2(texts):
    """GLUE TSV "sentence<TAB>label" with 0/1 labels and a header line."""
    rows = []
    for line in texts[0].splitlines()[1:]:
        sentence, _, label = line.rpartition("\t")
        if sentence.strip():
            rows.append({"text": sentence.strip(), "label": ["negative", "positive"][int(label)]})
    return rows


def convert_trec(texts):
    """Lines "DESC:manner How did serfdom develop ... ?"."""
    rows = []
    for line in texts[0].splitlines():
        fine, _, text = line.strip().partition(" ")
        if text:
            rows.append({"text": text, "label": fine.split(":")[0], "fine_label": fine})
    return rows


def convert_snips(texts):
    """Parallel files: seq.in (one utterance per line) and label (one intent per line)."""
    utterances, labels = texts[0].splitlines(), texts[1].splitlines()
    if len(utterances) != len(labels):
        raise ValueError(f"{len(utterances)} utterances but {len(labels)} labels")
    return [{"text": t.strip(), "label": l.strip()} for t, l in zip(utterances, labels) if t.strip()]


CONVERTERS = {"gsm8k": convert_gsm8k, "sst2": convert_sst2, "trec": convert_trec, "snips": convert_snips}


def download(url, desc):
    with requests.get(url, stream=True, timeout=60) as reply:
        reply.raise_for_status()
        total = int(reply.headers.get("content-length") or 0) or None
        chunks = []
        with tqdm(total=total, unit="B", unit_scale=True, desc=desc) as bar:
            for chunk in reply.iter_content(1 << 16):
                chunks.append(chunk)
                bar.update(len(chunk))
    data = b"".join(chunks)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:  # the TREC files are Latin-1
        return data.decode("latin-1")


def fetch(task, split, path):
    """Download `split` of a built-in task to `path`, or raise TaskError saying which file to put where."""
    need = f"Put it there by hand: JSONL, one object per line with {task.field_names()}."
    if task.name == "casehold":
        raise TaskError(f"{path} is missing. CaseHOLD is distributed only on the Hugging Face Hub "
                        f"(dataset 'casehold/casehold'); export its '{split}' split to {path} as JSONL, one object "
                        f"per line with citing_prompt, holding_0, ..., holding_4 and label (0-4).")
    if split not in SOURCES.get(task.name, {}):
        raise TaskError(f"{path} is missing and there is no public source for split {split!r}. {need}")
    try:
        rows = CONVERTERS[task.name]([download(url, f"{task.name} {split}") for url in SOURCES[task.name][split]])
    except Exception as e:  # network, HTTP or format failure: all end the same way for the user
        raise TaskError(f"{path} is missing and downloading it from {SOURCES[task.name][split][0]} failed "
                        f"({type(e).__name__}: {e}). {need}") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------
# Seed sampling. Stratified for classification so a 1% seed of TREC still contains its rare ABBR class;
# deterministic for a fixed seed; returned in file order so the seed file reads like the source.

def sample_seed(task, rows, size=None, frac=None, seed=0):
    if size is not None and frac is not None:
        raise TaskError("give a seed size or a seed fraction, not both")
    if frac is not None:
        if not 0 < frac <= 1:
            raise TaskError(f"seed fraction must be in (0, 1], got {frac}")
        size = round(frac * len(rows))
    size = len(rows) if size is None else int(size)
    if size > len(rows):
        raise TaskError(f"asked for {size} seed examples but {task.name} has only {len(rows)} training rows")
    if size <= 0:
        raise TaskError(f"the seed set would be empty ({task.name} has {len(rows)} training rows); "
                        f"use a larger seed size or fraction")
    rng = random.Random(seed)
    groups = {}
    for index, row in enumerate(rows):
        groups.setdefault(task.stratify_key(row), []).append(index)
    if len(groups) == 1:
        return [rows[i] for i in sorted(rng.sample(range(len(rows)), size))]
    # proportional shares, rounded by largest remainder so they sum to `size`; then every class gets at least
    # one example when there is room, taken from the largest share
    keys = sorted(groups, key=str)
    exact = {k: size * len(groups[k]) / len(rows) for k in keys}
    take = {k: int(exact[k]) for k in keys}
    for k in sorted(keys, key=lambda k: exact[k] - take[k], reverse=True)[:size - sum(take.values())]:
        take[k] += 1
    if size >= len(keys):
        for k in keys:
            if take[k] == 0:
                take[max(keys, key=lambda j: take[j])] -= 1
                take[k] = 1
    chosen = []
    for k in keys:
        chosen += rng.sample(groups[k], take[k])
    return [rows[i] for i in sorted(chosen)]


# ----------------------------------------------------------------------------------------------------------
# Filtering generated rows. Near-duplicates: Jaccard similarity of the sets of word bigrams of the main text
# (lowercase alphanumeric words, with start/end markers so one-word texts have bigrams too). At the default
# 0.7, changing a number or two in a 40-word problem is still a near-duplicate; changing names and numbers
# throughout is not. Prefix filtering over an inverted index keeps this exact and fast: a text B with
# J(A, B) >= t shares at least ceil(t*|A|) bigrams with A, so it shares one of A's |A|-ceil(t*|A|)+1 rarest
# bigrams, and only the (short) postings of those are scanned.

NEAR_DUPLICATE_THRESHOLD = 0.7


def bigrams(text):
    words = ["<s>"] + _words(text) + ["</s>"]
    return frozenset(zip(words, words[1:])) if len(words) > 2 else frozenset()


def jaccard(a, b):
    return len(a & b) / len(a | b) if a or b else 0.0


class NearDuplicateIndex:
    """Texts added so far, searchable for one with bigram Jaccard similarity >= threshold."""

    def __init__(self, texts=(), threshold=NEAR_DUPLICATE_THRESHOLD):
        self.threshold, self.sets, self.postings = threshold, [], {}
        for text in texts:
            self.add(text)

    def add(self, text):
        grams = bigrams(text)
        for gram in grams:
            self.postings.setdefault(gram, []).append(len(self.sets))
        self.sets.append(grams)

    def find(self, text):
        """Index of an added text at least `threshold` similar to `text`, or None."""
        grams = bigrams(text)
        if not grams:
            return None
        rarest = sorted(grams, key=lambda g: len(self.postings.get(g, ())))
        prefix = len(grams) - math.ceil(self.threshold * len(grams) - 1e-9) + 1
        seen = set()
        for gram in rarest[:prefix]:
            for other in self.postings.get(gram, ()):
                if other not in seen:
                    seen.add(other)
                    if jaccard(grams, self.sets[other]) >= self.threshold:
                        return other
        return None


def filter_generated(task, candidates, known_rows, test_rows, threshold=NEAR_DUPLICATE_THRESHOLD, quota=None):
    """(accepted, rejected) candidates; rejected rows are {"parent_id", "reason", "text"}.

    Builds its indexes from known_rows and test_rows on each call (about a second for 10k rows): call it once
    per iteration with all candidates, which also makes earlier candidates count as known for later ones.

    Checked in order: validate() (missing_field, not_a_number, bad_label, bad_marker, no_working, bad_calculation);
    test_overlap (same or near-duplicate main text as a test row: decontamination); duplicate (same normalized main
    text as a training row or an earlier candidate); near_duplicate (similarity >= threshold to either); surplus
    (`quota` = {parent_id: how many to accept} is spent for its parent). A surplus row never becomes "known", so an
    item a teacher wrote beyond what was asked cannot knock out another parent's candidate as a near-duplicate.
    """
    def text(row):
        return str(row.get(task.input_fields[0], ""))

    test_exact = {normalize_text(text(r)) for r in test_rows}
    test_near = NearDuplicateIndex(map(text, test_rows), threshold)
    known_exact = {normalize_text(text(r)) for r in known_rows}
    known_near = NearDuplicateIndex(map(text, known_rows), threshold)
    left = dict(quota or {})
    accepted, rejected = [], []
    for row in candidates:
        key = normalize_text(text(row))
        reason = task.validate(row)
        if reason is None and (key in test_exact or test_near.find(text(row)) is not None):
            reason = "test_overlap"
        elif reason is None and key in known_exact:
            reason = "duplicate"
        elif reason is None and known_near.find(text(row)) is not None:
            reason = "near_duplicate"
        elif reason is None and left.get(row.get("parent_id"), 1) <= 0:
            reason = "surplus"
        if reason:
            rejected.append({"parent_id": row.get("parent_id"), "reason": reason, "text": task.format_item(row)})
            continue
        accepted.append(row)
        if row.get("parent_id") in left:
            left[row["parent_id"]] -= 1
        known_exact.add(key)
        known_near.add(text(row))
    return accepted, rejected

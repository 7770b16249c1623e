"""Tests for tasks.py: answer extraction, teacher-reply parsing, calculator notes, filters, seed sampling, loading.

Run: python -m pytest -q tests/test_tasks.py   (CPU, no network; the real-data tests skip without ../shared/data)
"""

import json
import random
import re
import sys
from collections import Counter
from fractions import Fraction
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tasks  # noqa: E402
from tasks import TaskError, get_task  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
GSM8K, SST2, TREC, SNIPS, CASEHOLD = (get_task(n) for n in ("gsm8k", "sst2", "trec", "snips", "casehold"))


def gsm_row(number, question="Tom has 3 apples and buys 4 more. How many apples does he have?"):
    return {"id": "gsm8k-train-0", "question": question, "answer": f"He has 3+4 = <<3+4=7>>7.\n#### {number}"}


def casehold_row(label=2, prompt="The search went too far. See Smith v. Jones, 1 F.3d 2 (1st Cir. 1999) (<HOLDING>)."):
    return {"citing_prompt": prompt, **{f"holding_{i}": f"holding that rule {i} applies" for i in range(5)},
            "label": label}


# ------------------------------------------------------------------------------------------------------------
# Answer extraction and checking

@pytest.mark.parametrize("text, expected", [
    ("Natalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72", Fraction(72)),
    ("#### 1,200", Fraction(1200)),
    ("#### She earned $1,200.50 in total.", Fraction("1200.5")),
    ("#### The temperature drops to -5 degrees.", Fraction(-5)),
    ("#### $-5", Fraction(-5)),
    ("#### 1/2", Fraction(1, 2)),                                   # a fraction, not twelve
    ("#### 3.0", Fraction(3)),
    ("#### .5", Fraction(1, 2)),
    ("#### 20 - 18 = 2", Fraction(20)),                             # the first number on the line, unsigned
    ("#### 18\n\nNow a new question: how many are 40 and 2?\n#### 42", Fraction(18)),  # the first #### wins
    ("#### \nso the total is 42 apples.", None),                    # a #### line without a number: no answer
    ("so 20 - 18\n####", None),
    ("She earned $1,200.50 in total.", None),                        # no ####: no answer, whatever the numbers
    ("The answer is forty-two.", None),
    ("", None),
])
def test_extract_number(text, expected):
    assert tasks.extract_number(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("-5", Fraction(-5)), ("x = -5", Fraction(-5)), ("$-5", Fraction(-5)), ("\u22125", Fraction(-5)),
    ("20 - 18", Fraction(20)), ("20 -18", Fraction(20)), ("(3+4) -2", Fraction(3)),
])
def test_parse_number_sign(text, expected):
    assert tasks.parse_number(text) == expected
    numbers = [tasks._number_value(m) for m in tasks.NUMBER_RE.finditer(text)]
    assert all(n >= 0 for n in numbers[1:])          # a "-" after a digit or ")" is never a sign


@pytest.mark.parametrize("generated, gold, correct", [
    ("So the total is 1200 dollars.\n#### 1200", "1,200", True),
    ("#### $1,200.00", "1200", True),
    ("#### 3.0", "3", True),
    ("#### -5", "-5", True),
    ("#### 5", "-5", False),
    ("#### 12", "0.5", False),
    ("#### 1/2", "0.5", True),
    ("The answer is 1/2", "0.5", False),             # no "####"
    ("She has 7 apples", "7", False),
    ("no idea", "7", False),
    ("#### 7.01", "7", False),
])
def test_gsm8k_is_correct(generated, gold, correct):
    row = gsm_row(gold)
    assert GSM8K.is_correct(generated, row) is correct
    assert GSM8K.gold(row) == tasks.format_number(tasks.extract_number("#### " + gold))


def test_gsm8k_prompt_response_gold():
    row = gsm_row("1,080")
    assert GSM8K.prompt(row) == row["question"]
    assert GSM8K.response(row) == row["answer"]
    assert GSM8K.gold(row) == "1080"
    assert GSM8K.extract("blah #### $1,080.0") == "1080"
    assert GSM8K.stratify_key(row) is None


@pytest.mark.parametrize("task, text, expected", [
    (SST2, "positive", "positive"),
    (SST2, "  Positive.\n", "positive"),
    (SST2, "**NEGATIVE**", "negative"),
    (SST2, "Sentiment: negative (the reviewer is bored)", "negative"),
    (SST2, "positively glowing", None),        # a similar word is not the label
    (SST2, "neutral", None),
    (SST2, "", None),
    (SST2, "\u2581\u2581<unk>###", None),
    (TREC, "num", "NUM"),
    (TREC, "Answer: LOC.", "LOC"),
    (SNIPS, "Play Music", "PlayMusic"),
    (SNIPS, "intent: add_to_playlist", "AddToPlaylist"),
    (SNIPS, "searchscreeningevent!!", "SearchScreeningEvent"),
    (SNIPS, "GetWeatherForecast", None),
    (CASEHOLD, "2", "2"),
    (CASEHOLD, "(3)", "3"),
    (CASEHOLD, "Answer: 4", "4"),
    (CASEHOLD, "holding_1", "1"),
    (CASEHOLD, "The correct choice is Holding 0.", "0"),
    (CASEHOLD, "7", None),
    (CASEHOLD, "12", None),
])
def test_label_extraction(task, text, expected):
    assert task.extract(text) == expected


def test_label_is_correct_and_gold():
    row = {"text": "a gem of a movie", "label": "positive"}
    assert SST2.is_correct("Positive!", row)
    assert not SST2.is_correct("negative", row)
    assert not SST2.is_correct("I am not sure", row)      # outside the label set: wrong, not an error
    assert SST2.response(row) == "positive" and SST2.stratify_key(row) == "positive"
    assert CASEHOLD.gold(casehold_row(label="3")) == CASEHOLD.gold(casehold_row(label=3)) == "3"
    assert CASEHOLD.is_correct("Answer: (2)", casehold_row(label=2))
    assert not CASEHOLD.is_correct("1", casehold_row(label=2))
    assert CASEHOLD.response(casehold_row(label=2)) == "2"


def test_casehold_prompt_shows_all_holdings():
    prompt = CASEHOLD.prompt(casehold_row())
    assert "<HOLDING>" in prompt and all(f"({i}) holding that rule {i} applies" in prompt for i in range(5))


# ------------------------------------------------------------------------------------------------------------
# Calculator notes: a safe evaluator checked against values computed while building random expressions

def random_expression(rng, depth=0):
    if depth > 3 or rng.random() < 0.3:
        value = Fraction(rng.choice(["7", "12", "0.5", "3.25", "100", "2"]))
        return str(value.numerator) if value.denominator == 1 else str(float(value)), value
    (left, a), (right, b) = random_expression(rng, depth + 1), random_expression(rng, depth + 1)
    op = rng.choice("+-*/")
    value = {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else None}[op]
    if value is None:
        return left, a
    return f"({left}{op}{right})", value


def test_safe_arithmetic_matches_reference():
    rng = random.Random(0)
    for _ in range(300):
        text, value = random_expression(rng)
        assert tasks.safe_arithmetic(text) == value, text
    assert tasks.safe_arithmetic("-3 + 2 * (4 - 1)") == 3
    assert tasks.safe_arithmetic("20% * 50") == 10
    assert tasks.safe_arithmetic("1,200 * 2") == 2400
    assert tasks.safe_arithmetic("7 // 2") == 3


@pytest.mark.parametrize("expr", ["__import__('os').system('echo hi')", "2**3", "a+1", "(1+2", "1+", "1/0",
                                  "", "open('x')", "1)" , "9" * 10 + "+" * 300])
def test_safe_arithmetic_rejects(expr):
    with pytest.raises(ValueError):
        tasks.safe_arithmetic(expr)


@pytest.mark.parametrize("rationale, ok", [
    ("Natalia sold 48/2 = <<48/2=24>>24 clips.\nIn total 48+24 = <<48+24=72>>72.\n#### 72", True),
    ("Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\n#### 10", True),
    ("Each share is 10/3 = <<10/3=3.33>>3.33.\n#### 3.33", True),          # rounded to the shown digits
    ("He fills 7/2 = <<7/2=3>>3 whole boxes.\n#### 3", True),              # off by half a unit: still allowed
    ("Half is <<2-1.5=.5>>.5\n#### .5", True),
    ("He bakes 12*3 = <<12*3=38>>38 muffins.\n#### 38", False),
    ("Each share is 10/3 = <<10/3=3.3>>3.3, then <<3.3*3=10.5>>.\n#### 10.5", False),
    ("Total <<2*__import__('os')=0>>0\n#### 0", False),
    ("Total <<5+5>>10\n#### 10", False),                                   # no result in the note
    ("So <<0.5+0.4=0>>0 are left.\n#### 0", False),                       # 0.9 is not 0
    ("So <<2.6+0.3=2>>2 are left.\n#### 2", False),                       # 2.9 is not 2
    ("A third is <<1/3=0.33>>0.33.\n#### 0.33", True),
    ("Two thirds is <<2/3=0.67>>0.67.\n#### 0.67", True),
    ("Two thirds is <<2/3=0.66>>0.66.\n#### 0.66", False),                # off by more than half of 0.01
    ("Each gets <<20/3=6>>6.\n#### 6", False),                            # 6.67 truncated: more than half a unit
    ("It loses <<5-8=-3>>-3.\n#### -3", True),
    ("No notes at all, 3 and 4 make 7.\n#### 7", True),
])
def test_check_calculations(rationale, ok):
    assert (tasks.check_calculations(rationale) is None) is ok


@pytest.mark.skipif(not (SHARED / "gsm8k" / "train.jsonl").exists(), reason="../shared/data not present")
def test_real_gsm8k_notes_pass_and_corrupted_ones_fail():
    rows = GSM8K.load("train", SHARED)[:1500]
    assert all(tasks.check_calculations(r["answer"]) is None for r in rows)
    corrupted = [re.sub(r"(<<[^=>]*=)", r"\g<1>1", r["answer"], count=1) for r in rows if "<<" in r["answer"]]
    assert corrupted[0].startswith("Natalia sold 48/2 = <<48/2=124>>24")
    assert sum(tasks.check_calculations(a) is not None for a in corrupted) == len(corrupted)


# ------------------------------------------------------------------------------------------------------------
# Teacher replies

GSM_REPLY = """Sure! Here are 3 new problems similar to the one you gave:

**1. Question:** Anna has 5 pears and buys 6 more. How many pears does she have?
**Answer:** She has 5+6 = <<5+6=11>>11 pears.
#### 11


2) Question: Ben reads 7 pages a day for 3 days. How many pages does he read?
Answer: He reads 7*3 = <<7*3=21>>21 pages.
**#### 21**

### Problem 3
Question 3: A box holds 12 eggs. Mia buys 4 boxes and breaks 5 eggs. How many eggs are left?
Answer: She buys 12*4 = <<12*4=48>>48 eggs.
She has 48-5 = <<48-5=43>>43 left.
#### 43

I hope these problems help your students practice!"""


def test_parse_gsm8k_reply_with_preamble_markdown_and_chatter():
    rows, rejected = GSM8K.parse_reply(GSM_REPLY)
    assert rejected == []
    assert [r["question"][:8] for r in rows] == ["Anna has", "Ben read", "A box ho"]
    assert rows[1]["answer"] == "He reads 7*3 = <<7*3=21>>21 pages.\n#### 21"
    assert rows[2]["answer"].endswith("#### 43") and "I hope" not in rows[2]["answer"]
    assert [GSM8K.gold(r) for r in rows] == ["11", "21", "43"]
    assert all(GSM8K.validate(r) is None for r in rows)


def test_parse_truncated_reply_drops_only_last_item():
    cut = GSM_REPLY[:GSM_REPLY.index("She has 48-5")]
    rows, rejected = GSM8K.parse_reply(cut, truncated=True)
    assert len(rows) == 2 and [reason for reason, _ in rejected] == ["truncated"]
    assert "A box holds 12 eggs" in rejected[0][1]
    # not truncated: the same text keeps its last item, which then fails validation for having no "####"
    rows, rejected = GSM8K.parse_reply(cut)
    assert len(rows) == 3 and GSM8K.validate(rows[2]) == "not_a_number"


@pytest.mark.parametrize("reply", ["I'm sorry, but I can't help with that.", "```\n{}\n```", "1. 2. 3."])
def test_parse_garbage_reply(reply):
    assert GSM8K.parse_reply(reply) == ([], [("unparseable", reply.strip())])
    assert GSM8K.parse_reply("   \n") == ([], [])


def test_parse_reply_missing_field():
    rows, rejected = GSM8K.parse_reply("1. Question: What is 2 and 2?\n\n2. Question: Q2\nAnswer: 2+2=4\n#### 4")
    assert len(rows) == 1 and rejected[0][0] == "missing_field"


def test_parse_classification_reply():
    reply = ("Here are two new snippets:\n\n1. **Text:** a tedious , overlong mess\n**Label:** Negative\n\n"
             "2. Text: what a delight from start to finish\nLabel: positive\n\n"
             "3. Text: it is neither good nor bad\nLabel: neutral\n\n"
             "4. Text: good in parts , dull in others\nLabel: positive/negative\n\nLet me know if you need more.")
    rows, rejected = SST2.parse_reply(reply)
    assert rejected == []
    assert rows[0] == {"text": "a tedious , overlong mess", "label": "negative"}
    assert rows[1]["label"] == "positive" and rows[2]["label"] == "neutral"
    assert [SST2.validate(r) for r in rows] == [None, None, "bad_label", "bad_label"]


def test_parse_casehold_reply():
    item = CASEHOLD.format_item(casehold_row(label=4))
    reply = f"Sure.\n\n1. {item}\n\n2. {item.replace('Answer: 4', '**Answer:** (Holding 1)')}\n\n" \
            f"3. {item.replace('Answer: 4', 'Answer: 1 or 2')}\n\n4. Citing prompt: only a prompt"
    rows, rejected = CASEHOLD.parse_reply(reply)
    assert len(rows) == 3 and [r for r, _ in rejected] == ["missing_field"]
    assert rows[0] == {k: str(v) for k, v in casehold_row(label=4).items()}
    assert [r["label"] for r in rows] == ["4", "1", "1 or 2"]
    assert [CASEHOLD.validate(r) for r in rows] == [None, None, "bad_label"]


MARKDOWN_REPLY = """Here are 4 new problems:

**1.** **Question:** Anna has 5 pears and buys 6 more. How many pears does she have?
**Answer:** She has 5+6 = <<5+6=11>>11 pears.
#### 11

---

### Problem 2
- **Question 2:** Ben reads 7 pages a day.

He reads for 3 days. How many pages does he read?
- **Answer 2:** He reads 7*3 = <<7*3=21>>21 pages.
#### 21

### Question
A box holds 12 eggs. How many eggs are in 4 boxes?
### Answer
4*12 = <<4*12=48>>48 eggs.
#### 48

4. **Question**: Cleo has 9 stamps and gives away 4. How many are left?
**Answer**: 9-4 = <<9-4=5>>5
**#### 5**"""


def test_parse_reply_markdown_styles_and_multi_paragraph_fields():
    rows, rejected = GSM8K.parse_reply(MARKDOWN_REPLY)
    assert rejected == []
    assert [r["question"] for r in rows] == [
        "Anna has 5 pears and buys 6 more. How many pears does she have?",
        "Ben reads 7 pages a day.\n\nHe reads for 3 days. How many pages does he read?",  # both paragraphs kept
        "A box holds 12 eggs. How many eggs are in 4 boxes?",
        "Cleo has 9 stamps and gives away 4. How many are left?"]
    assert [r["answer"] for r in rows] == [
        "She has 5+6 = <<5+6=11>>11 pears.\n#### 11", "He reads 7*3 = <<7*3=21>>21 pages.\n#### 21",
        "4*12 = <<4*12=48>>48 eggs.\n#### 48", "9-4 = <<9-4=5>>5\n#### 5"]
    assert all(GSM8K.validate(r) is None for r in rows)


def test_parse_reply_last_field_stops_before_chatter():
    reply = ("1. Input: Capital of Chile?\n\nAnswer in one word.\nOutput: Santiago\n\nI hope this helps!\n\n"
             "### Example 2\n2. Input: Capital of Cuba?\nOutput: Havana\n\n---\nLet me know!")
    task = tasks.Task(name="own", answer_type="exact", labels=None, input_fields=("input",), target_field="output",
                      instruction="{input}", reply_keys=(("Input", "input"), ("Output", "output")),
                      prompt_file="custom.txt")
    assert task.parse_reply(reply)[0] == [
        {"input": "Capital of Chile?\n\nAnswer in one word.", "output": "Santiago"},
        {"input": "Capital of Cuba?", "output": "Havana"}]


@pytest.mark.parametrize("answer, reason", [
    ("#### 12", "no_working"),
    ("The answer is 12.\n#### 12", "no_working"),
    ("**Answer:**\n\n#### 12", "no_working"),
    ("She has 4 bags of 3, so 12 apples.\n#### 12", "no_working"),
    ("She has 4*3 = 12 apples.\n#### 12", None),
    ("She has <<4*3=12>>12 apples.\n#### 12", None),
    ("She has 4 x 3 = 12 apples.\n#### 12", None),
])
def test_gsm8k_needs_working_before_the_answer(answer, reason):
    rows, rejected = GSM8K.parse_reply(f"1. Question: Each bag has 3 apples. How many in 4 bags?\nAnswer: {answer}")
    assert rejected == [] and GSM8K.validate(rows[0]) == reason


@pytest.mark.skipif(not (SHARED / "gsm8k" / "test.jsonl").exists(), reason="../shared/data not present")
def test_real_gsm8k_gold_shows_working():
    rows = GSM8K.load("test", SHARED)
    assert [GSM8K.validate(r) for r in rows] == [None] * len(rows)


@pytest.mark.parametrize("prompt, reason", [
    ("The frisk went too far. See Doe v. Roe, 1 F.3d 2 (2d Cir. 1996) (<HOLDING>).", None),
    ("The frisk went too far. See Doe v. Roe, 1 F.3d 2 (2d Cir. 1996) (holding that a frisk is limited).",
     "bad_marker"),
    ("The frisk went too far. See Doe v. Roe (<HOLDING>); Poe v. Moe (<HOLDING>).", "bad_marker"),
])
def test_casehold_needs_one_holding_marker(prompt, reason):
    reply = "1. " + CASEHOLD.format_item(casehold_row(label=1, prompt=prompt))
    rows, rejected = CASEHOLD.parse_reply(reply)
    assert rejected == [] and rows[0]["citing_prompt"] == prompt and CASEHOLD.validate(rows[0]) == reason


# ------------------------------------------------------------------------------------------------------------
# Teacher messages

@pytest.mark.parametrize("task, row", [
    (GSM8K, gsm_row("7")), (SST2, {"text": "a gem", "label": "positive"}), (TREC, {"text": "Who ?", "label": "HUM"}),
    (SNIPS, {"text": "play jazz", "label": "PlayMusic"}), (CASEHOLD, casehold_row()),
])
def test_teacher_messages_every_task(task, row):
    system, user = task.teacher_messages(row, 5)
    assert system["role"] == "system" and user["role"] == "user"
    assert task.format_item(row) in user["content"] and "5 new" in user["content"]
    assert "{" not in system["content"] + user["content"].replace(task.format_item(row), "")
    with_student = task.teacher_messages(row, 5, student_answer="WRONG-ANSWER")[1]["content"]
    assert "WRONG-ANSWER" in with_student and "WRONG-ANSWER" not in user["content"]


OWN = tasks.Task(name="own", answer_type="exact", labels=None, input_fields=("input",), target_field="output",
                 instruction="{input}", reply_keys=(("Input", "input"), ("Output", "output")), prompt_file="custom.txt")


@pytest.mark.parametrize("task, row", [
    (GSM8K, gsm_row("7")), (SST2, {"text": "a gem", "label": "positive"}), (TREC, {"text": "Who ?", "label": "HUM"}),
    (SNIPS, {"text": "play jazz", "label": "PlayMusic"}), (CASEHOLD, casehold_row()), (OWN, {"input": "a", "output": "b"}),
])
def test_demonstration_shows_one_valid_item_and_no_count(task, row):
    """The demonstration never contradicts {n}: one item, introduced without a number, that passes our own checks."""
    user = task.teacher_messages(row, 3)[1]["content"]
    assert re.findall(r"(?m)^\d+[.)] ", user) == ["1. "]
    assert not re.search(r"\b(two|three|four|five|one new|2 new)\b", user, re.I)
    assert "Write exactly 3 new" in user
    demo = user[user.index("in the reply format:"):user.index("Now the real task")]
    rows, rejected = task.parse_reply(demo)
    assert len(rows) == 1 and rejected == [] and task.validate(rows[0]) is None


def test_teacher_messages_insert_values_verbatim():
    row = gsm_row("7", question="What is {n} plus {gold}? {0.__class__} and {unknown}")
    user = GSM8K.teacher_messages(row, 3)[1]["content"]
    assert "What is {n} plus {gold}? {0.__class__} and {unknown}" in user


def test_prompt_file_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(tasks, "PROMPTS_DIR", tmp_path)
    (tmp_path / "gsm8k.txt").write_text("### system\nHi {nope}\n### user\n{example}\n")
    with pytest.raises(TaskError, match=r"gsm8k.txt.*unknown placeholder \{nope\}"):
        GSM8K.teacher_messages(gsm_row("7"), 2)
    (tmp_path / "sst2.txt").write_text("only a comment\n")
    with pytest.raises(TaskError, match=r"sst2.txt.*### system"):
        SST2.teacher_messages({"text": "a", "label": "positive"}, 2)


# ------------------------------------------------------------------------------------------------------------
# Near-duplicates, decontamination and filtering

def test_near_duplicate_index_matches_brute_force():
    rng = random.Random(1)
    vocab = [f"w{i}" for i in range(30)] + ["the", "a", "of", "how", "many"] * 6
    texts = [" ".join(rng.choice(vocab) for _ in range(rng.randint(1, 12))) for _ in range(400)]
    for threshold in (0.3, 0.5, 0.7, 0.9):
        index = tasks.NearDuplicateIndex(texts[:300], threshold)
        for query in texts[300:]:
            q = tasks.bigrams(query)
            brute = [tasks.jaccard(q, tasks.bigrams(t)) >= threshold for t in texts[:300]]
            found = index.find(query)
            assert (found is not None) == any(brute)
            assert found is None or brute[found]


def test_bigram_jaccard_on_realistic_rewrites():
    seed = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May."
    numbers_only = "Natalia sold clips to 52 of her friends in April, and then she sold half as many clips in May."
    rewritten = "Marco sold stickers to 30 of his classmates in June, and then he sold a third as many in July."
    sim = lambda a, b: tasks.jaccard(tasks.bigrams(a), tasks.bigrams(b))  # noqa: E731
    assert sim(seed, seed.upper() + "!!") == 1.0
    assert sim(seed, numbers_only) >= tasks.NEAR_DUPLICATE_THRESHOLD > sim(seed, rewritten)


def test_filter_generated_reasons():
    known = [gsm_row("7")]
    test = [{"question": "Sara has 10 red balloons and 5 blue ones. How many balloons does she have in all?",
             "answer": "#### 15"}]
    new = "Lena bakes 4 trays of 9 cookies each. How many cookies does she bake?"

    def cand(question, answer, parent="gsm8k-train-0"):
        return {"question": question, "answer": answer, "parent_id": parent}

    candidates = [
        cand(new, "4*9 = <<4*9=36>>36\n#### 36"),                                        # accepted
        cand(new.replace("Lena", "LENA") + " ", "4*9 = <<4*9=36>>36\n#### 36"),           # duplicate of earlier
        cand(new.replace("4 trays", "5 trays"), "5*9 = <<5*9=45>>45\n#### 45"),           # near-dup of earlier
        cand(known[0]["question"].replace("3", "5"), "5+4 = <<5+4=9>>9\n#### 9"),         # near-dup of training
        cand(known[0]["question"], "3+4 = <<3+4=7>>7\n#### 7"),                           # exact dup of training
        cand(test[0]["question"].replace("10", "12"), "12+5 = 17\n#### 17"),               # decontamination
        cand("Ivan walks 3 km a day. How far does he walk in a week?", "3*7 = <<3*7=22>>22\n#### 22"),
        cand("Ivan walks 3 km a day. How far does he walk in 9 days?", "He walks 27 km.\n#### twenty-seven"),
        cand("", "#### 5"),
        cand("Omar has 12 stamps. How many stamps does he have?", "#### 12"),              # no working
    ]
    accepted, rejected = tasks.filter_generated(GSM8K, candidates, known, test)
    assert accepted == [candidates[0]]
    assert [r["reason"] for r in rejected] == ["duplicate", "near_duplicate", "near_duplicate", "duplicate",
                                              "test_overlap", "bad_calculation", "not_a_number", "missing_field",
                                              "no_working"]
    assert all(r["parent_id"] == "gsm8k-train-0" and isinstance(r["text"], str) for r in rejected)


def test_filter_generated_labels_and_decontamination_of_short_texts():
    known = [{"text": "a gem of a movie", "label": "positive"}]
    test = [{"text": "unflinchingly bleak and desperate", "label": "negative"}]
    candidates = [{"text": "Unflinchingly bleak , and desperate .", "label": "negative", "parent_id": "p"},
                  {"text": "a gem of a movie !", "label": "positive", "parent_id": "p"},
                  {"text": "a quiet triumph", "label": "Positive", "parent_id": "p"},
                  {"text": "a loud , hollow spectacle", "label": "negative", "parent_id": "p"}]
    accepted, rejected = tasks.filter_generated(SST2, candidates, known, test)
    assert accepted == [candidates[3]]
    assert [r["reason"] for r in rejected] == ["test_overlap", "duplicate", "bad_label"]


# ------------------------------------------------------------------------------------------------------------
# Seed sampling

def labelled(counts):
    return [{"id": f"t-{i}", "text": f"t{i}", "label": label}
            for i, label in enumerate(label for label, n in counts.items() for _ in range(n))]


def test_sample_seed_stratified_and_deterministic():
    rows = labelled({"HUM": 500, "LOC": 300, "NUM": 190, "ABBR": 10})
    seed = tasks.sample_seed(TREC, rows, size=100, seed=3)
    assert Counter(r["label"] for r in seed) == {"HUM": 50, "LOC": 30, "NUM": 19, "ABBR": 1}
    assert seed == tasks.sample_seed(TREC, rows, size=100, seed=3)
    assert seed != tasks.sample_seed(TREC, rows, size=100, seed=4)
    assert [r["id"] for r in seed] == sorted((r["id"] for r in seed), key=lambda i: int(i[2:]))  # file order
    small = tasks.sample_seed(TREC, rows, size=4, seed=0)       # every class present when there is room
    assert sorted(r["label"] for r in small) == ["ABBR", "HUM", "LOC", "NUM"]
    assert len(tasks.sample_seed(TREC, rows, frac=0.05)) == 50


def test_sample_seed_unstratified_and_errors():
    rows = [gsm_row(str(i)) | {"id": f"gsm8k-train-{i}"} for i in range(50)]
    seed = tasks.sample_seed(GSM8K, rows, size=10, seed=0)
    assert len(seed) == 10 and len({r["id"] for r in seed}) == 10
    assert tasks.sample_seed(GSM8K, rows) == rows
    with pytest.raises(TaskError, match="only 50"):
        tasks.sample_seed(GSM8K, rows, size=51)
    with pytest.raises(TaskError, match="empty"):
        tasks.sample_seed(GSM8K, rows, frac=0.001)
    with pytest.raises(TaskError, match="fraction"):
        tasks.sample_seed(GSM8K, rows, frac=1.5)
    with pytest.raises(TaskError, match="not both"):
        tasks.sample_seed(GSM8K, rows, size=5, frac=0.1)


# ------------------------------------------------------------------------------------------------------------
# Loading

@pytest.mark.skipif(not SHARED.exists(), reason="../shared/data not present")
@pytest.mark.parametrize("name, n_train, n_test", [("gsm8k", 7473, 1319), ("sst2", 67349, 872),
                                                    ("trec", 5452, 500), ("snips", 13084, 700)])
def test_load_real_files(name, n_train, n_test):
    task = get_task(name)
    train, test = task.load("train", SHARED), task.load("test", SHARED)
    assert (len(train), len(test)) == (n_train, n_test)
    assert train[5]["id"] == f"{name}-train-5" and test[-1]["id"] == f"{name}-test-{n_test - 1}"
    assert all(task.is_correct(task.response(r), r) for r in test)
    if task.labels:
        assert {task.gold(r) for r in train} == set(task.labels)


@pytest.mark.parametrize("lines, message", [
    (['{"text": "ok", "label": "positive"}', "", '{"text": "bad", "label": positive}'],
     r"train.jsonl:3: not valid JSON"),
    (['{"text": "ok", "label": "positive"}', '["text", "label"]'], r"train.jsonl:2: expected a JSON object"),
    (['{"text": "ok"}'], r"train.jsonl:1: missing field 'label'"),
    (['{"text": "ok", "label": "meh"}'], r"train.jsonl:1: label 'meh' is not one of"),
    (['{"text": ["a"], "label": "positive"}'], r"train.jsonl:1: field 'text' must be a string"),
    (["", "  "], r"train.jsonl: no rows"),
])
def test_load_malformed(tmp_path, lines, message):
    (tmp_path / "sst2").mkdir()
    (tmp_path / "sst2" / "train.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(TaskError, match=message):
        SST2.load("train", tmp_path)


def test_load_gsm8k_without_final_answer(tmp_path):
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text(json.dumps({"question": "q", "answer": "the answer is 5"}) + "\n")
    with pytest.raises(TaskError, match=r"test.jsonl:1: 'answer' has no number on its '####' line"):
        GSM8K.load("test", tmp_path)


def test_casehold_fixture(tmp_path):
    (tmp_path / "casehold").mkdir()
    rows = [casehold_row(label=i % 5, prompt=f"Case {i} cites Doe (<HOLDING>).") for i in range(10)]
    rows[3]["label"] = "3"                                       # labels come as int or str
    (tmp_path / "casehold" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = CASEHOLD.load("train", tmp_path)
    assert [CASEHOLD.gold(r) for r in loaded] == [str(i % 5) for i in range(10)]
    assert CASEHOLD.is_correct("holding_3", loaded[3]) and not CASEHOLD.is_correct("4", loaded[3])
    seed = tasks.sample_seed(CASEHOLD, loaded, size=5)
    assert sorted(CASEHOLD.gold(r) for r in seed) == ["0", "1", "2", "3", "4"]


# ------------------------------------------------------------------------------------------------------------
# A user's own task

def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_own_task_exact(tmp_path):
    train = write_jsonl(tmp_path / "capitals.jsonl", [{"input": "Capital of France?", "output": "Paris"}] * 3)
    test = write_jsonl(tmp_path / "capitals_test.jsonl", [{"input": "Capital of Peru?", "output": "Lima"}])
    task = get_task(str(train), test_file=str(test))
    assert task.name == "capitals" and task.answer_type == "exact"
    rows = task.load("test")
    assert rows[0]["id"] == "capitals-test-0" and task.prompt(rows[0]) == "Capital of Peru?"
    assert task.is_correct("  lima.", rows[0]) and task.is_correct("Answer: LIMA", rows[0])
    assert not task.is_correct("Lima, Peru", rows[0])
    reply = "1. Input: Capital of Chile?\nOutput: Santiago\n\nThanks!\n2. Input: Capital of Cuba?\nOutput: Havana"
    assert task.parse_reply(reply)[0] == [{"input": "Capital of Chile?", "output": "Santiago"},
                                          {"input": "Capital of Cuba?", "output": "Havana"}]
    assert "Capital of Peru?" in task.teacher_messages(rows[0], 2)[1]["content"]


def test_own_task_label_and_number(tmp_path):
    data = tmp_path / "spam" / "train.jsonl"
    data.parent.mkdir()
    write_jsonl(data, [{"input": "win money now", "output": "spam"}, {"input": "lunch?", "output": "ham"}])
    task = get_task(str(data), answer_type="label")
    assert task.name == "spam" and task.labels == ["ham", "spam"]
    assert task.extract("Label: SPAM.") == "spam" and task.stratify_key({"output": "ham"}) == "ham"
    given = ["spam", "ham", "unsure"]
    assert get_task(str(data), answer_type="label", labels=given).labels == given
    with pytest.raises(TaskError, match="no test file"):
        task.load("test")
    nums = write_jsonl(tmp_path / "sums.jsonl", [{"input": "2+2", "output": "4"},
                                                 {"input": "half of 3", "output": "1.5"}])
    task = get_task(str(nums), answer_type="number")
    rows = task.load("train")
    assert task.is_correct("The result is 4.0", rows[0]) and task.is_correct("3/2", rows[1])
    write_jsonl(nums, [{"input": "2+2", "output": "four"}])
    with pytest.raises(TaskError, match=r"sums.jsonl:1: 'output' has no number"):
        task.load("train")


def test_get_task_errors(tmp_path):
    with pytest.raises(TaskError, match="casehold, gsm8k, snips, sst2, trec"):
        get_task("gsm9k")
    with pytest.raises(TaskError, match="file not found"):
        get_task(str(tmp_path / "missing.jsonl"))
    write_jsonl(tmp_path / "t.jsonl", [{"input": "a", "output": "b"}])
    with pytest.raises(TaskError, match="answer type 'regex'"):
        get_task(str(tmp_path / "t.jsonl"), answer_type="regex")
    assert tasks.KNOWN == sorted(tasks.TASKS) and get_task("trec") is TREC


# ------------------------------------------------------------------------------------------------------------
# Fetching (no network here: the download is replaced, the conversion and file handling are real)

RAW_FILES = {
    "TREC.train.all": "DESC:manner How did serfdom develop in and then leave Russia ?\n"
                      "ENTY:cremat What films featured the character Popeye Doyle ?\n",
    "train.tsv": "sentence\tlabel\nhide new secretions from the parental units \t0\nthe greatest musicians \t1\n",
    "seq.in": "listen to westbam alumb allergic on google music\nadd step to me to the 50 clásicos playlist\n",
    "label": "PlayMusic\nAddToPlaylist\n",
    "train.jsonl": json.dumps({"question": "q?", "answer": "2+2=<<2+2=4>>4\n#### 4"}) + "\n",
}


@pytest.mark.parametrize("name, first", [
    ("trec", {"text": "How did serfdom develop in and then leave Russia ?", "label": "DESC",
              "fine_label": "DESC:manner"}),
    ("sst2", {"text": "hide new secretions from the parental units", "label": "negative"}),
    ("snips", {"text": "listen to westbam alumb allergic on google music", "label": "PlayMusic"}),
    ("gsm8k", {"question": "q?", "answer": "2+2=<<2+2=4>>4\n#### 4"}),
])
def test_fetch_converts_and_writes(tmp_path, monkeypatch, name, first):
    monkeypatch.setattr(tasks, "download", lambda url, desc: RAW_FILES[url.rsplit("/", 1)[-1]])
    rows = get_task(name).load("train", tmp_path)
    assert {k: v for k, v in rows[0].items() if k != "id"} == first
    assert sorted(p.name for p in (tmp_path / name).iterdir()) == ["train.jsonl"]   # no temporary file left


def test_fetch_failure_says_where_to_put_the_file(tmp_path, monkeypatch):
    def offline(url, desc):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(tasks, "download", offline)
    with pytest.raises(TaskError, match=r"sst2/test.jsonl is missing and downloading it from https://\S+ failed "
                                        r"\(ConnectionError.*Put it there by hand"):
        SST2.load("test", tmp_path)
    assert not (tmp_path / "sst2" / "test.jsonl").exists()
    with pytest.raises(TaskError, match=r"casehold/train.jsonl is missing.*casehold/casehold.*citing_prompt"):
        CASEHOLD.load("train", tmp_path)

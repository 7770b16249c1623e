"""Strict grading on real, messy model outputs: what a small chat model writes, and the answer a careful human
grader reads from it (None: no committed answer, so wrong whatever the gold).

Run: python -m pytest -q tests/test_grading.py   (CPU, no network)

The expected answers were written by hand from the rules in tasks.py: GSM8K reads the first "####" line only; a
label answer must name exactly one label (a label right after a negation does not count) or open with it.
"""
import json
import sys
from fractions import Fraction
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tasks  # noqa: E402
from tasks import get_task  # noqa: E402

GSM8K, SST2, TREC, SNIPS, CASEHOLD = (get_task(n) for n in ("gsm8k", "sst2", "trec", "snips", "casehold"))


# ------------------------------------------------------------------------------------------------------------
# GSM8K

GSM8K_OUTPUTS = [
    # a fine-tuned student: clean
    ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72", 72),
    # runs on after its answer and starts a new problem with its own "####"
    ("He has 3+4 = <<3+4=7>>7 apples.\n#### 18\n\nQuestion: Sam has 2 cats and 5 dogs. How many pets?\n"
     "Answer: 2+5 = <<2+5=7>>7\n#### 7", 18),
    # cut off (max_new_tokens) before any "####": whatever number came last is not an answer
    ("First, we find how many eggs she has left: 16 - 3 - 4 = 9 eggs. Then she sells them for $2 each, so", None),
    # the subtraction ends the line before an empty "####"
    ("The difference is 20 - 18\n####", None),
    ("So 20 - 18 = 2 more pages.\n#### 2", 2),
    # markdown, a currency sign, thousands separators and a unit
    ("**Step 1:** 12 * $100 = $1,200\n**Step 2:** $1,200 - $150 = $1,050\n\n#### $1,050 dollars", 1050),
    ("The final answer is:\n#### **1,050**", 1050),
    # the student repeats the question's numbers on the "####" line: the first one is its answer
    ("#### 5 (because 10 / 2 = 5)", 5),
    ("#### -3", -3),
    ("She is 3 - 5 = -2 years ahead.\n####-2", -2),
    ("Total = 12.50 + 7.50 = 20.00\n#### 20.00", 20),
    ("#### 0.5", Fraction(1, 2)),
    ("#### 1/4", Fraction(1, 4)),
    # a chat model that never uses the format
    ("Answer: 72", None),
    ("The answer is $\\boxed{72}$.", None),
    ("#### seventy-two", None),
    ("####\n72", None),
    ("", None),
]


@pytest.mark.parametrize("text, expected", GSM8K_OUTPUTS)
def test_gsm8k_messy_outputs(text, expected):
    expected = None if expected is None else Fraction(expected)
    assert tasks.extract_number(text) == expected
    gold = {"question": "q", "answer": f"Work: 1+1 = <<1+1=2>>2\n#### {tasks.format_number(expected or Fraction(99))}"}
    assert GSM8K.is_correct(text, gold) is (expected is not None)
    assert GSM8K.extract(text) == (None if expected is None else tasks.format_number(expected))


def test_gsm8k_gold_with_two_final_lines_reads_the_first():
    row = {"question": "q", "answer": "3+4 = <<3+4=7>>7\n#### 7\n#### 9"}
    assert GSM8K.gold(row) == "7" and GSM8K.is_correct("#### 7", row) and not GSM8K.is_correct("#### 9", row)


# ------------------------------------------------------------------------------------------------------------
# Label tasks

LABEL_OUTPUTS = [
    (SST2, "positive", "positive"),
    (SST2, "Positive", "positive"),
    (SST2, "**Negative**", "negative"),
    (SST2, "Sentiment: **Positive**.", "positive"),
    (SST2, "The sentiment of this movie review is positive.", "positive"),
    (SST2, "Negative.\n\nThe reviewer calls the film 'a tedious mess'; nothing positive is said about it.", "negative"),
    (SST2, "The sentiment is not positive; it is negative.", "negative"),     # negation: the committed label
    (SST2, "This review isn't negative. Overall it is positive.", "positive"),
    (SST2, "Positive, not negative.", "positive"),
    (SST2, "negative or positive", None),                                    # a hedge
    (SST2, "It could be positive or negative depending on the reader.", None),
    (SST2, "positive/negative", None),
    (SST2, "The review is mixed: partly positive, partly negative.", None),
    (SST2, "Not positive.", None),                                          # no committed label
    (SST2, "Neutral", None),
    (SST2, "The reviewer does not express a negative opinion; the sentiment is positive.", "positive"),  # reach
    (SST2, "The sentiment is positively glowing.", None),                    # a similar word is not the label
    (SST2, "I'm sorry, I can't determine the sentiment.", None),
    (TREC, "NUM", "NUM"),
    (TREC, "**Answer:** LOC", "LOC"),
    (TREC, "HUM (human)", "HUM"),
    (TREC, "The type is ENTY.", "ENTY"),
    (TREC, "NUM (numeric). The question asks for a number, not a description (DESC).", "NUM"),
    (TREC, "**DESC**\n\nExplanation: the question asks how something works, so it is not ENTY or NUM.", "DESC"),
    (TREC, "DESC or NUM", None),
    (TREC, "HUM\nLOC", None),                                                # a list split over lines is a list
    (TREC, "1. HUM\n2. LOC", None),
    (TREC, "**Answer:** HUM\n\nLOC (location)", None),
    (TREC, "HUM\n\nHUM (human): the question asks who.", "HUM"),             # the same label again is no list
    (TREC, "Answer:\nNUM\nIt is neither HUM nor LOC.", "NUM"),               # negated on a later line
    (SST2, "positive\nnegative", None),
    (SST2, "Positive.\nThe acting, though, is negative in places.", None),
    (SNIPS, "PlayMusic\nAddToPlaylist", None),
    (TREC, "DESC, NUM", None),
    (TREC, "It is either HUM or LOC.", None),
    (TREC, "The answer is LOC. HUM would fit a person.", None),              # two labels and "The" opens it
    (TREC, "Location", None),                                               # not the label's name
    (SNIPS, "PlayMusic", "PlayMusic"),
    (SNIPS, "add to play list", "AddToPlaylist"),
    (SNIPS, "Intent: add_to_playlist", "AddToPlaylist"),
    (SNIPS, "The intent is **Get Weather**.", "GetWeather"),
    (SNIPS, "SearchScreeningEvent - the user wants to know the movie times.", "SearchScreeningEvent"),
    (SNIPS, "BookRestaurant\n\nThis is not PlayMusic because the user wants a table.", "BookRestaurant"),
    (SNIPS, "PlayMusic or AddToPlaylist", None),
    (SNIPS, "SearchCreativeWork/PlayMusic", None),
    (SNIPS, "GetWeatherForecast", None),
    (CASEHOLD, "2", "2"),
    (CASEHOLD, "(3)", "3"),
    (CASEHOLD, "Answer: 4", "4"),
    (CASEHOLD, "holding_1", "1"),
    (CASEHOLD, "The correct holding is (0).", "0"),
    (CASEHOLD, "1 or 2", None),
    (CASEHOLD, "Either (1) or (3).", None),
    (CASEHOLD, "7", None),
]


@pytest.mark.parametrize("task, text, expected", LABEL_OUTPUTS)
def test_label_messy_outputs(task, text, expected):
    assert task.extract(text) == expected
    for label in task.labels:  # correct for its own gold only; a hedge or non-answer for none
        row = {"text": "t", "citing_prompt": "c (<HOLDING>)", **{f"holding_{i}": "h" for i in range(5)},
               "label": label}
        assert task.is_correct(text, row) is (label == expected)


def test_seed_and_test_grading_agree_on_real_gold(tmp_path):
    """A gold answer read back as if the student wrote it is correct, for every task (the same grader grades both)."""
    rows = [(GSM8K, {"question": "q", "answer": "2*3 = <<2*3=6>>6\n#### 6"}),
            (SST2, {"text": "a gem", "label": "positive"}), (TREC, {"text": "Who ?", "label": "HUM"}),
            (SNIPS, {"text": "play jazz", "label": "PlayMusic"}),
            (CASEHOLD, {"citing_prompt": "c (<HOLDING>)", **{f"holding_{i}": "h" for i in range(5)}, "label": 3})]
    for task, row in rows:
        assert task.is_correct(task.response(row), row)


# ------------------------------------------------------------------------------------------------------------
# Verbatim answers of the untrained SmolLM2-135M-Instruct (greedy, 48 or 160 new tokens) to test rows of each task:
# the answers an iteration-0 student that has not learned the format gives. Expected answers read by hand.

SMOLLM2_OUTPUTS = [
    (SST2, "The sentiment of this movie review is generally positive. The reviewer praises the movie's charm and the "
           "journey it's on, which is a common trope in cinema. They also mention that the movie is often affecting, "
           "which suggests that the reviewer", "positive"),
    (SST2, "The sentiment of this movie review is neutral. The reviewer expresses a general sentiment about a movie, "
           "but does not explicitly state a negative sentiment. They simply acknowledge the movie's slow pace and "
           "provide a positive note.", None),                                 # the old grader read "negative"
    (SST2, "The sentiment of this movie review is generally positive, but it can be interpreted in a negative way. "
           "The reviewer mentions that the movie lacks both thrills and humor, which can be seen as a double-edged "
           "sword. They also mention that", None),                            # the old grader read "positive"
    (SST2, "The sentiment of this movie review is neutral. The reviewer does not express a negative opinion about the "
           "movie itself, but rather expresses a neutral sentiment of \"a cookie-cutter movie\" that does no",
     None),                                                               # neutral, not negative: no label
    (SST2, "The sentiment of this movie review is neutral, and it does not believe in itself, which is a positive "
           "sentiment. It is simply uninspired and lacks humor.", None),
    (SST2, "The sentiment of this movie review is generally positive, but it's also a bit mixed. The reviewer "
           "mentions that the film 's easygoing blend of comedy and romance, which is a common trope in cinema.", None),
    (SST2, "The sentiment of this movie review is predominantly negative. The reviewer expresses their disappointment "
           "and frustration with the movie's execution, ", "negative"),
    (TREC, "The answer to this question is: ABBR (abbreviation)", "ABBR"),
    (TREC, "The answer to this question is \"DESC\"", "DESC"),
    (TREC, "The answer to this question is Australia 's national flower is the **Amaranth**.", None),
    (TREC, "The metal with the highest melting point is the LON (Longevity) and the metal with the highest density is "
           "the LON (Longevity).", None),
    (SNIPS, "The intent of this request is to add to playlist, BookRestaurant, and get weather.", None),
    (SNIPS, "This request is one of AddToPlaylist, BookRestaurant, GetWeather, and SearchCreativeWork.", None),
    (SNIPS, "This request is one of AddToPlaylist, BookRestaurant, GetWeather, RateBook, SearchCreativeWork, "
            "SearchScreeningEvent.", None),                                   # the old grader read "AddToPlaylist"
    (SNIPS, "This request is a classic example of a request to add to playlists. The user is asking for a list of "
            "items that are new to the Playlist, which is a classic example of a request to add to playlists.", None),
    (GSM8K, "James runs 60 meters each sprint, so he runs 60 times a week.\nTo find out how many total meters he runs "
            "a week, we need to multiply the number of sprints by the number of times he runs each sprint.\nSo, 60 * 3 "
            "= 180 meters.\nTherefore, James runs 180 meters a week.\n#### 180\nThe answer is: 180", "180"),
    (GSM8K, "Janet\u2019s ducks lay 16 eggs per day, which is equivalent to 16 * 3 = 48 eggs per day. She eats three "
            "for breakfast every morning, so she eats 48 * 3 = 156 eggs per day. She sells the remainder at the "
            "farmers\u2019 market daily for $2 per fresh duck egg, so she sells 156 * 4 = 624 eggs per day.\n\nTo find "
            "out how many dollars she makes every day, we need to calculate the total amount of money she earns from "
            "selling the remaining eggs. She earns 624 * 4 = 2480 dollars per day.\n\nTo find out how many dollars "
            "she makes per day, we can divide the", None),                    # cut off: the old grader read 2480
]


@pytest.mark.parametrize("task, text, expected", SMOLLM2_OUTPUTS)
def test_real_small_model_outputs(task, text, expected):
    assert task.extract(text) == expected


# ------------------------------------------------------------------------------------------------------------
# A user's own tasks

def own_task(tmp_path, rows, answer_type):
    path = tmp_path / f"own_{answer_type}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return get_task(str(path), answer_type=answer_type)


@pytest.mark.parametrize("text, expected", [
    ("spam", "spam"), ("Label: SPAM.", "spam"), ("**Ham**\n\nThis is a normal message, not spam.", "ham"),
    ("spam or ham", None), ("It is not spam.", None), ("Spam? Ham? Hard to say.", None),
])
def test_own_label_task(tmp_path, text, expected):
    task = own_task(tmp_path, [{"input": "win money", "output": "spam"}, {"input": "lunch?", "output": "ham"}], "label")
    assert task.extract(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("42", 42), ("Answer: 42", 42), ("**Answer:** $1,200 in total", 1200), ("The result is 4.0", 4),
    ("12 apples (3 bags of 4)", None), ("-7", -7), ("Result: -7 degrees", -7), ("#### 9\n\n#### 10", 9),
    ("**Answer:** 42\n\nExplanation: 40 + 2 = 42", 42), ("42. Because 40 + 2 = 42.", 42), ("4.5 kg", 4.5),
    ("3 or 4", None), ("It is either 3 or 4.", None), ("2+2 = 4", None), ("between 3 and 5", None), ("four", None),
])
def test_own_number_task(tmp_path, text, expected):
    task = own_task(tmp_path, [{"input": "2+2", "output": "4"}], "number")
    assert tasks.answer_number(text) == (None if expected is None else Fraction(str(expected)))
    row = {"input": "q", "output": str(expected if expected is not None else 99)}
    assert task.is_correct(text, row) is (expected is not None)

"""Per-parent quotas in augmentation: an item a teacher writes beyond what was asked never blocks another seed.

Run: python -m pytest -q tests/test_augment.py   (CPU, no network, no model)

The teacher here is a stand-in for teacher.Teacher with the same chat_many() result shape, answering each seed with
a scripted reply, so the test controls exactly which items collide.
"""
import re

import llm2llm
from config import Config
import tasks

SST2 = tasks.get_task("sst2")
SEED_A = {"id": "sst2-train-1", "text": "a dull and lifeless film", "label": "negative"}
SEED_B = {"id": "sst2-train-2", "text": "the music carries every scene", "label": "positive"}
B_ONLY = "the soundtrack soars and the cast shines in nearly every scene"
A_SURPLUS = "the soundtrack soars and the cast shines in nearly every single scene"
# asked for one item, the teacher writes two for seed A; the second is a near-duplicate of B's only candidate
REPLIES = {
    SEED_A["text"]: "1. Text: a flat , airless thriller with no surprises\nLabel: negative\n\n"
                    f"2. Text: {A_SURPLUS}\nLabel: positive",
    SEED_B["text"]: f"1. Text: {B_ONLY}\nLabel: positive",
}


class ScriptedTeacher:
    budget_exhausted = False

    def __init__(self):
        self.asked = []

    def chat_many(self, jobs):
        results = []
        for job in jobs:
            seed_text = re.findall(r"Text: (.*)", job["messages"][-1]["content"])[-1].strip()
            self.asked.append(seed_text)
            results.append({"choices": [{"text": REPLIES[seed_text], "finish_reason": "stop"}], "error": None,
                            "prompt_tokens": 10, "completion_tokens": 20, "cache_key": f"key-{seed_text}"})
        return results


def test_near_duplicates_really_collide():
    assert tasks.jaccard(tasks.bigrams(B_ONLY), tasks.bigrams(A_SURPLUS)) >= tasks.NEAR_DUPLICATE_THRESHOLD


def test_filter_generated_applies_the_quota_before_indexing():
    candidates = [{"text": "a flat , airless thriller with no surprises", "label": "negative", "parent_id": "A"},
                  {"text": A_SURPLUS, "label": "positive", "parent_id": "A"},
                  {"text": B_ONLY, "label": "positive", "parent_id": "B"}]
    assert tasks.filter_generated(SST2, candidates[:2], [], [])[0] == candidates[:2]   # no quota: both kept
    accepted, rejected = tasks.filter_generated(SST2, candidates, [], [])
    assert [r["reason"] for r in rejected] == ["near_duplicate"]                        # ... and B's is knocked out
    quota = {"A": 1, "B": 1}
    accepted, rejected = tasks.filter_generated(SST2, candidates, [], [], quota=quota)
    assert accepted == [candidates[0], candidates[2]]
    assert [(r["parent_id"], r["reason"]) for r in rejected] == [("A", "surplus")]
    assert quota == {"A": 1, "B": 1}                                              # the caller's dict is untouched
    # the quota counts accepted items only: a rejected first item leaves room for the parent's second
    bad_first = [dict(candidates[0], label="neutral")] + candidates[1:2]
    accepted, rejected = tasks.filter_generated(SST2, bad_first, [], [], quota={"A": 1})
    assert accepted == [candidates[1]] and [r["reason"] for r in rejected] == ["bad_label"]


def test_augment_surplus_item_does_not_block_another_seed():
    cfg = Config(task="sst2", aug_per_wrong=1, teacher_max_asks=1, teacher_model="scripted")
    teacher = ScriptedTeacher()
    predictions = {SEED_A["id"]: {"answer": "positive"}, SEED_B["id"]: {"answer": "negative"}}
    accepted, rejected, unsatisfied, usage = llm2llm.augment(SST2, teacher, [SEED_A, SEED_B], predictions,
                                                             [SEED_A, SEED_B], [], 0, cfg)
    assert teacher.asked == [SEED_A["text"], SEED_B["text"]]
    assert [(a["provenance"]["parent_id"], a["text"]) for a in accepted] == [
        (SEED_A["id"], "a flat , airless thriller with no surprises"), (SEED_B["id"], B_ONLY)]
    assert [(r["parent_id"], r["reason"]) for r in rejected] == [(SEED_A["id"], "surplus")]
    assert unsatisfied == [] and usage["replies"] == 2

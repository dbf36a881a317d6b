"""The review queue (prediction and evaluation share it): most doubtful first, reproducible order."""

import pandas as pd
import pytest

from diffseg.review import review_queue, write_review_queue


def test_queue_sorts_by_ged_without_a_risk_column_ties_by_id():
    scores = pd.DataFrame({"id": ["c", "a", "b", "d"], "ged": [0.1, 0.3, 0.3, 0.2]})
    queue = review_queue(scores)
    assert queue["id"].tolist() == ["a", "b", "d", "c"]
    assert queue["rank"].tolist() == [1, 2, 3, 4]
    assert set(queue["sorted_by"]) == {"ged"}


def test_queue_sorts_by_risk_when_every_image_has_one(tmp_path):
    scores = pd.DataFrame({"id": ["a", "b", "c"], "ged": [0.3, 0.2, 0.1], "risk": [0.1, 0.9, 0.5]})
    queue = write_review_queue(scores, tmp_path / "review_queue.csv")
    assert queue["id"].tolist() == ["b", "c", "a"]
    written = pd.read_csv(tmp_path / "review_queue.csv")
    assert written.columns.tolist() == ["rank", "sorted_by", "id", "ged", "risk"]
    assert written["id"].tolist() == ["b", "c", "a"] and set(written["sorted_by"]) == {"risk"}
    partial = scores.assign(risk=[0.1, None, 0.5])  # a missing risk falls back to GED for the whole queue
    assert review_queue(partial)["id"].tolist() == ["a", "b", "c"]


def test_queue_refuses_duplicate_ids():
    with pytest.raises(ValueError, match="duplicate image id 'a'"):
        review_queue(pd.DataFrame({"id": ["a", "a"], "ged": [0.1, 0.2]}))

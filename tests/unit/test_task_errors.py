"""benchmarks/task_errors.py's classification of a wrong list answer, on hand-made token arrays."""

from __future__ import annotations

import numpy as np
import pytest

SEP = np.array([90, 91])  # ", " as two tokens


def _case(answer, pred, before=(1, 2, 3)):
    from benchmarks.task_errors import first_error

    return first_error(np.array(before), np.array(answer), np.array(pred), SEP)


def test_a_right_answer_has_no_error():
    assert _case([5, 6, 90, 91, 7, 8], [5, 6, 90, 91, 7, 8]) is None


@pytest.mark.parametrize(
    ("pred", "item", "kind"),
    [
        ([4, 6, 90, 91, 7, 8], 0, "copied"),  # 4: in the facts, wrong
        ([99, 6, 90, 91, 7, 8], 0, "blurred"),  # 99: nowhere before the answer
        ([5, 6, 90, 91, 4, 8], 1, "copied"),  # the second item's first token
    ],
)
def test_a_first_token_read_wrong_is_a_copy_or_a_blur(pred, item, kind):
    # Facts hold 5 6 and 7 8, and 4.
    assert _case([5, 6, 90, 91, 7, 8], pred, before=(4, 5, 6, 0, 7, 8)) == (item, 0, kind)


def test_the_first_wrong_token_counts_not_a_later_one():
    assert _case([5, 6, 90, 91, 7, 8], [5, 99, 90, 91, 99, 8], before=(5, 6, 7, 8)) == (0, 1, "unique")


def test_a_later_token_that_went_on_from_another_occurrence_of_the_token_before():
    # Two names begin with 5: "5 6" (the answer's) and "5 3" (another's). Reading 3 after 5 went on from the
    # other one; reading 8 after 5 did not, though it could have.
    before = (0, 5, 6, 0, 5, 3, 0, 7, 8)
    assert _case([5, 6, 90, 91, 7, 8], [5, 3, 90, 91, 7, 8], before) == (0, 1, "went on")
    assert _case([5, 6, 90, 91, 7, 8], [5, 8, 90, 91, 7, 8], before) == (0, 1, "ambiguous")
    # Where 5 is always followed by 6, a wrong read after it is "unique", whatever the model chose.
    assert _case([5, 6, 90, 91, 7, 8], [5, 3, 90, 91, 7, 8], (0, 5, 6, 0, 3, 7, 8)) == (0, 1, "unique")
    # The second item's second token: 7 is followed by 8 and by 2 in the facts.
    assert _case([5, 6, 90, 91, 7, 8], [5, 6, 90, 91, 7, 2], (5, 6, 7, 2, 7, 8)) == (1, 1, "went on")

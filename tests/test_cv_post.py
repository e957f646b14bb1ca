"""Post-processing chosen on out-of-fold predictions (segan.cv_post): the choice, and its use by the ensemble."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from segan.config import PostprocessConfig
from segan.cv_post import MIN_GAIN, candidates, case_score, region_posts, select
from segan.postprocess import postprocess

REGIONS = ["whole", "core"]
LABELS = [[1, 2], [2]]


def _case(tmp: Path, i: int, spurious: bool, core_prob: float) -> tuple[Path, Path]:
    """Whole = a 10^3 cube (a 4^3 core in it); the model finds both, plus (optionally) a far 3^3 false blob
    for whole and a core probability of ``core_prob``, with a 0.45 halo around the core."""
    truth = np.zeros((2, 32, 32, 32), bool)
    truth[0, 4:14, 4:14, 4:14] = True
    truth[1, 7:11, 7:11, 7:11] = True
    prob = np.zeros((2, 32, 32, 32), np.float32)
    prob[0][truth[0]] = 0.9
    if spurious:
        prob[0, 24:27, 24:27, 24:27] = 0.8
    prob[1, 6:12, 6:12, 6:12] = 0.45  # a halo just under 0.5 ...
    prob[1][truth[1]] = core_prob
    p, t = tmp / f"{i}_p.npy", tmp / f"{i}_t.npy"
    np.save(p, prob.astype(np.float16))
    np.save(t, truth)
    return p, t


def test_largest_component_is_chosen_where_it_removes_false_blobs(tmp_path: Path) -> None:
    cases = [_case(tmp_path, i, spurious=True, core_prob=0.9) for i in range(3)]
    chosen, before, after = select(cases, PostprocessConfig(), REGIONS, LABELS)
    assert chosen["whole"]["largest_component"] is True
    assert before == pytest.approx((2 * 1000 / (1000 + 1027) + 1.0) / 2) and after == pytest.approx(1.0)
    # the core was right already: the config's setting stays
    assert "core" not in chosen


def test_threshold_moves_only_when_it_helps_on_the_out_of_fold_cases(tmp_path: Path) -> None:
    # the core is predicted at 0.42 inside (under the default 0.5, over 0.4) and 0.45 in the halo:
    # no threshold recovers it exactly, 0.3/0.4 over-segment (Dice 64/216 -> 0.46), 0.5 misses it (0)
    cases = [_case(tmp_path, i, spurious=False, core_prob=0.42) for i in range(2)]
    chosen, before, after = select(cases, PostprocessConfig(), REGIONS, LABELS)
    assert chosen["core"]["threshold"] in (0.3, 0.4)
    assert after >= before + MIN_GAIN
    # nothing to gain: the choice is empty and the scores are equal
    clean = [_case(tmp_path, 10 + i, spurious=False, core_prob=0.9) for i in range(2)]
    chosen, before, after = select(clean, PostprocessConfig(), REGIONS, LABELS)
    assert chosen == {} and before == after == pytest.approx(1.0)


def test_case_score_reads_masks_back_through_the_label_map() -> None:
    truth = np.zeros((2, 8, 8, 8), bool)
    truth[0, 2:6, 2:6, 2:6] = True
    truth[1, 3:5, 3:5, 3:5] = True
    prob = truth.astype(np.float32)
    prob[0] = 0.0  # whole missed, but the core is painted as label 2, which is whole too
    score = case_score(prob, truth, [PostprocessConfig()] * 2, LABELS)
    assert score == pytest.approx((2 * 8 / (8 + 64) + 1.0) / 2)


def test_region_posts_and_per_region_postprocess() -> None:
    base = PostprocessConfig(min_size=3)
    posts = region_posts(base, {"core": {"threshold": 0.7, "largest_component": True, "ignored": 1}}, REGIONS)
    assert posts[0] == base and posts[1] == PostprocessConfig(threshold=0.7, largest_component=True, min_size=3)
    assert len(candidates(base)) == 10 and candidates(base)[0] is base
    prob = np.full((2, 4, 4, 4), 0.6, np.float32)
    masks = postprocess(prob, posts)
    assert masks[0].all() and not masks[1].any()
    with pytest.raises(ValueError, match="1 post-processing settings for 2 regions"):
        postprocess(prob, posts[:1])

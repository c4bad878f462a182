import pytest
import torch

from rollmill.algos.filters import difficulty_mask, informative_groups, overlong_penalty


def test_std_filter_worked_example():
    scores = torch.tensor([[1.0, 1, 1, 1], [0, 0, 0, 0], [1, 0, 0, 1]])
    assert informative_groups(scores, std_threshold=0.0).tolist() == [False, False, True]


def test_mean_filter_bounds_are_strict():
    scores = torch.tensor([[0.2, 0.0], [1.0, 0.0], [1.0, 0.8]])
    assert informative_groups(scores, std_threshold=-1, mean_low=0.1, mean_high=0.9).tolist() == [False, True, False]


def test_group_of_one_is_never_informative_by_std():
    assert informative_groups(torch.tensor([[1.0], [0.0]])).tolist() == [False, False]


def test_difficulty_mask():
    scores = torch.tensor([[1.0, 1, 1, 1], [0, 0, 0, 0], [1, 0, 0, 1]])
    assert difficulty_mask(scores).tolist() == [[0] * 4, [0] * 4, [1] * 4]
    assert difficulty_mask(scores, low=0.5, high=1.0)[2].tolist() == [0, 0, 0, 0]


def test_overlong_penalty_worked_example():
    lengths = torch.tensor([15000, 16384, 18432, 20480, 21000])
    assert overlong_penalty(lengths, max_len=20480, cache_len=4096).tolist() == pytest.approx([0, 0, -0.5, -1, -1])
    with pytest.raises(ValueError, match="cache_len"):
        overlong_penalty(lengths, max_len=10, cache_len=20)

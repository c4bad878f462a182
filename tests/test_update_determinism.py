"""The same update on the same weights gives the same gradient, bit for bit: a run's seed fixes its
result. (On CPU the backward of advanced indexing with repeated indices adds with atomics in thread
order; the training forward gathers its predictor positions with index_select, whose backward does not.)"""

import pytest
import torch

from rollmill.models import build_tiny_model
from rollmill.train.batch import build_batch
from rollmill.train.logprobs import completion_logprobs
from rollmill.types import Row


@pytest.fixture
def two_threads():
    """The atomics race only with more than one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_a_group_sharing_one_prompt_gets_the_same_gradient_every_time(two_threads):
    model = build_tiny_model(64, hidden_size=256, num_layers=1, intermediate_size=256, seed=0)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, 64, (12,), generator=g).tolist()
    # many one-token samples of one prompt: its last position predicts each of them
    rows = [Row(prompt, [token], [1], [0.0], [0], [0]) for token in torch.randint(3, 64, (2000,), generator=g).tolist()]
    batch = build_batch(rows, torch.randn(len(rows), generator=g), pad_id=2)
    weights = torch.randn(batch.mask.shape, generator=g)

    def gradient() -> torch.Tensor:
        model.zero_grad()
        logp, _ = completion_logprobs(model, batch)
        (logp * weights * batch.mask).sum().backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    first = gradient()
    assert first.abs().sum() > 0
    for _ in range(5):
        assert torch.equal(gradient(), first)

"""Data-parallel training (train/parallel.py): N gloo ranks with FSDP2 take the update one process takes.

Each case runs the same step twice: in this process alone, and in 2 spawned processes that form a
gloo group, shard the model with FSDP2 and are each given the whole batch. Loss, gradient norm, every
gradient (summed over ranks) and every updated weight must agree, in float64, to 1e-9.
"""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp

from rollmill.config import AlgorithmConfig, LoraConfig, TrainConfig
from rollmill.models import build_char_tokenizer, build_tiny_model
from rollmill.train import PolicyTrainer, build_batch
from rollmill.train.parallel import DataParallel
from rollmill.types import Row

# (loss aggregation, mini-batch size, PPO epochs, LoRA rank, other algorithm keys): token and sequence means, a
# single pass and several mini-batches over two epochs (the old-log-prob path), full fine-tuning and LoRA; N
# counting every row and GPG's alpha, whose row counts must not include the ranks' padding rows
CASES = {
    "token_mean": ("token-mean", None, 1, 0, {}),
    "seq_mean_minibatches": ("seq-mean-token-mean", 4, 2, 0, {}),
    "seq_mean_token_sum_norm": ("seq-mean-token-sum-norm", None, 1, 0, {}),
    "lora_token_mean": ("token-mean", 5, 1, 4, {}),
    "all_rows_gpg_alpha": ("seq-mean-token-sum-norm", 4, 1, 0,
                           {"loss_agg_seq_count": "all", "loss_agg_norm_by_seqs": True, "gpg_rescale": True}),
}


def rows_and_advantages():
    """7 samples of 3 prompts (an odd count: one rank gets a padding row), lengths 1-6, some masked tokens; the
    second sample's advantage is 0."""
    g = torch.Generator().manual_seed(0)
    vocab = len(build_char_tokenizer())
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (3, 5, 2)]
    rows = []
    for i in range(7):
        tokens = torch.randint(3, vocab, (1 + (i * 5) % 6,), generator=g).tolist()
        row = Row.sampled(prompts[i % 3], tokens, (-torch.rand(len(tokens), generator=g) * 3).tolist())
        rows.append(row)
    return rows, torch.randn(7, generator=g) * (torch.arange(7) != 1)


def make_trainer(case: str, parallel: DataParallel | None):
    agg, mini, epochs, rank, options = CASES[case]
    torch.manual_seed(0)
    model = build_tiny_model(len(build_char_tokenizer()), seed=3)
    if rank:
        from rollmill.models.lora import add_adapters

        add_adapters(model, LoraConfig(rank=rank, target_modules=["q_proj", "v_proj", "down_proj"]))
        with torch.no_grad():  # B = 0 at the start gives A no gradient: move B off zero so both are checked
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
    model.double()  # after the adapters, which peft creates in float32
    if parallel is not None:
        from rollmill.train.parallel import shard_model

        shard_model(model)
    cfg = TrainConfig(lr=1e-2, micro_batch_size=2, mini_batch_size=mini, ppo_epochs=epochs, max_grad_norm=0.5)
    algo = AlgorithmConfig(loss_agg=agg, **options)
    return PolicyTrainer(model, cfg, algo, max_new_tokens=8, parallel=parallel)


def one_step(case: str, parallel: DataParallel | None) -> dict:
    """Metrics, gradients and weights after one step, whole tensors by name (only rank 0's are complete)."""
    from rollmill.train.checkpoint import gather_weights

    trainer = make_trainer(case, parallel)
    rows, adv = rows_and_advantages()
    metrics = trainer.step(build_batch(rows, adv, pad_id=2))
    grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
             for n, p in trainer.model.named_parameters() if p.grad is not None}
    weights = {k: v.clone() for k, v in gather_weights(trainer.model).items()}
    return {"metrics": metrics, "grads": grads, "weights": weights}


def _rank(rank: int, world: int, port: int, case: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        result = one_step(case, DataParallel.current())
        if rank == 0:
            torch.save(result, out)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_gloo_ranks_take_the_single_process_update(case, tmp_path):
    alone = one_step(case, None)
    out = tmp_path / "rank0.pt"
    mp.spawn(_rank, args=(2, free_port(), case, str(out)), nprocs=2, join=True)
    ranked = torch.load(out, weights_only=False)
    for key in ("loss", "grad_norm", "entropy", "clip_fraction", "ratio"):
        assert ranked["metrics"][key] == pytest.approx(alone["metrics"][key], rel=1e-9, abs=1e-12), key
    assert set(ranked["grads"]) == set(alone["grads"]) and alone["grads"]
    for name, g in alone["grads"].items():
        torch.testing.assert_close(ranked["grads"][name], g, rtol=1e-9, atol=1e-12, msg=name)
    assert set(ranked["weights"]) == set(alone["weights"])
    for name, w in alone["weights"].items():
        torch.testing.assert_close(ranked["weights"][name], w, rtol=1e-9, atol=1e-12, msg=name)
    changed = [n for n, w in alone["weights"].items() if not torch.equal(w, make_reference_weights(case)[n])]
    assert changed, "the step changed no weight: the comparison would prove nothing"


def make_reference_weights(case: str) -> dict:
    return {k: v.clone() for k, v in make_trainer(case, None).model.state_dict().items()}


def test_rows_give_each_rank_contiguous_parts_padded_to_one_size():
    # 7 rows in mini-batches of 4: [0..3] -> 2 + 2, [4..6] -> 2 + 1 (+ a loss-free copy of row 4)
    index0, keep0, per0 = DataParallel(0, 2).rows(7, 4)
    index1, keep1, per1 = DataParallel(1, 2).rows(7, 4)
    assert per0 == per1 == 2
    assert index0.tolist() == [0, 1, 4, 5] and keep0.tolist() == [1, 1, 1, 1]
    assert index1.tolist() == [2, 3, 6, 4] and keep1.tolist() == [1, 1, 1, 0]
    # more ranks than rows: the extra rank trains padding only, and still runs the same forwards
    index, keep, per = DataParallel(2, 3).rows(2, 2)
    assert per == 1 and index.tolist() == [0] and keep.tolist() == [0]


def critic_step(parallel: DataParallel | None) -> dict:
    """Values, then one critic fit (two mini-batches, two epochs) on the test batch; whole tensors back."""
    from rollmill.config import AlgorithmConfig
    from rollmill.train.checkpoint import gather_weights, restore_weights
    from rollmill.train.critic import CriticTrainer

    torch.manual_seed(0)
    policy = build_tiny_model(len(build_char_tokenizer()), seed=3).double()
    critic = CriticTrainer(policy, TrainConfig(micro_batch_size=2, mini_batch_size=4, ppo_epochs=2, max_grad_norm=0.5),
                           AlgorithmConfig(advantage="gae", critic_lr=1e-2), parallel)
    # a non-zero head (zero at the start gives the body no gradient), set whole: the head may be sharded
    head = torch.randn(1, policy.config.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    restore_weights(critic.model, {"head.weight": head * 0.5}, {"head.weight"}, "test")
    rows, adv = rows_and_advantages()
    batch = build_batch(rows, torch.zeros(7), pad_id=2)
    _, returns, old_values = critic.advantages(batch, adv.double())
    metrics = critic.step(batch, old_values, returns)
    return {"values": old_values, "metrics": metrics,
            "weights": {k: v.clone() for k, v in gather_weights(critic.model).items()}}


def _critic_rank(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        result = critic_step(DataParallel.current())
        if rank == 0:
            torch.save(result, out)
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_fit_the_critic_as_one_process(tmp_path):
    alone = critic_step(None)
    out = tmp_path / "rank0.pt"
    mp.spawn(_critic_rank, args=(2, free_port(), str(out)), nprocs=2, join=True)
    ranked = torch.load(out, weights_only=False)
    assert alone["values"].abs().sum() > 0
    torch.testing.assert_close(ranked["values"], alone["values"], rtol=1e-9, atol=1e-12)
    for key in ("value_loss", "critic/grad_norm", "critic/value_mean"):
        assert ranked["metrics"][key] == pytest.approx(alone["metrics"][key], rel=1e-9, abs=1e-12), key
    for name, w in alone["weights"].items():
        torch.testing.assert_close(ranked["weights"][name], w, rtol=1e-9, atol=1e-12, msg=name)


def _checkpoint_rank(rank: int, world: int, port: int, out: str) -> None:
    """One step on 2 ranks, then the whole weights and optimizer state, as a checkpoint stores them."""
    import torch.distributed as dist

    from rollmill.train.checkpoint import gather_optimizer, gather_weights

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        trainer = make_trainer("token_mean", DataParallel.current())
        rows, adv = rows_and_advantages()
        trainer.step(build_batch(rows, adv, pad_id=2))
        state = {"weights": gather_weights(trainer.model), "optimizer": gather_optimizer(trainer.model, trainer.optimizer)}
        if rank == 0:
            torch.save(state, out)
    finally:
        dist.destroy_process_group()


def test_a_step_taken_on_two_ranks_resumes_in_one_process(tmp_path):
    """Checkpoints hold whole tensors by name, whatever the rank count: 2 ranks' step 1 restored into one
    process and stepped again equals one process stepping twice (weights and AdamW moments)."""
    from rollmill.train.checkpoint import restore_optimizer, restore_weights

    rows, adv = rows_and_advantages()
    straight = make_trainer("token_mean", None)
    for _ in range(2):
        straight.step(build_batch(rows, adv, pad_id=2))
    out = tmp_path / "ranks.pt"
    mp.spawn(_checkpoint_rank, args=(2, free_port(), str(out)), nprocs=2, join=True)
    state = torch.load(out, weights_only=False)
    resumed = make_trainer("token_mean", None)
    restore_weights(resumed.model, state["weights"], set(state["weights"]), "2 ranks")
    restore_optimizer(resumed.model, resumed.optimizer, state["optimizer"])
    resumed.step(build_batch(rows, adv, pad_id=2))
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12, msg=name)

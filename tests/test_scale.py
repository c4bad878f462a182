"""Scale-up settings on this CPU: LoRA (peft), bf16 autocast, devices; CUDA paths skip without a GPU."""

from __future__ import annotations

import json

import pytest
import torch

from rollmill.config import ConfigError, LoraConfig
from rollmill.models import build_char_tokenizer, build_tiny_model
from rollmill.models.device import DeviceError, resolve_device
from rollmill.models.lora import add_adapters, lora_scalings, merged_weights
from rollmill.train import build_batch, completion_logprobs
from rollmill.train.checkpoint import list_checkpoints, load_weights
from rollmill.types import Row

LORA = {"rank": 4, "target_modules": ["q_proj", "v_proj", "up_proj"]}
def cuda(test):
    """A test of a CUDA path: marked `gpu` (scripts/gpu_check.sh runs `-m gpu`), skipped without a device."""
    skip = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu_check.sh)")
    return pytest.mark.gpu(skip(test))


def tiny_adapted(seed=0):
    model = build_tiny_model(len(build_char_tokenizer()), seed=seed)
    peft_model = add_adapters(model, LoraConfig(**LORA))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(1))
    return model, peft_model


def test_merged_weights_compute_what_the_adapted_model_computes():
    model, _ = tiny_adapted()
    plain = build_tiny_model(len(build_char_tokenizer()), seed=0)
    merged = merged_weights(model.state_dict(), lora_scalings(model))
    assert sorted(merged) == sorted(f"model.layers.{i}.{m}.weight" for i in range(2)
                                    for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj"))
    before = plain.model.layers[0].self_attn.q_proj.weight.clone()
    plain.load_state_dict(merged, strict=False)
    assert not torch.equal(before, plain.model.layers[0].self_attn.q_proj.weight)  # the adapters moved it
    ids = torch.randint(3, 40, (2, 9), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(plain(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    # every weight: the plain model's state dict, nothing left over
    full = merged_weights(model.state_dict(), lora_scalings(model), adapted_only=False)
    assert set(full) == set(plain.state_dict())


def test_adapters_start_as_the_identity_and_train_alone():
    model = build_tiny_model(len(build_char_tokenizer()), seed=0)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    add_adapters(model, LoraConfig(**LORA))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    merged = merged_weights(model.state_dict(), lora_scalings(model))
    assert all(torch.equal(t, base[name]) for name, t in merged.items())


def test_lora_run_syncs_adapted_layers_only_and_its_reference_is_the_base(tiny_cfg, make_job, tmp_path):
    cfg = tiny_cfg(model={"lora": LORA}, algorithm={"track_kl": True}, train={"lr": 5e-2})
    job = make_job(cfg, tmp_path / "run")
    learner, worker = job.roles.learner, job.roles.workers[0]
    assert learner.trainer.ref_model is learner.model  # no second copy of the weights
    sent = learner.weights()
    assert set(sent) == set(merged_weights(learner.model.state_dict(), learner.scalings))
    before = {k: v.clone() for k, v in worker.engine.model.state_dict().items()}
    rec, _ = job.train_step()
    assert rec["kl"] == pytest.approx(0.0, abs=1e-9)  # adapters start at B = 0: policy == reference
    rec, _ = job.train_step()
    assert rec["kl"] > 0  # they moved, and the reference (adapters off) did not
    engine = worker.engine.model.state_dict()
    changed = {k for k in engine if not torch.equal(engine[k], before[k])}
    assert changed == set(sent)  # the engine serves the merged adapted layers, the rest untouched
    for name, t in learner.weights().items():
        torch.testing.assert_close(engine[name], t)


def test_lora_checkpoint_holds_the_adapter_resumes_exactly_and_merges_for_evaluation(tiny_cfg, straight_and_resumed,
                                                                                       tmp_path):
    cfg = tiny_cfg(model={"lora": LORA}, train={"lr": 5e-2})
    straight, resumed = straight_and_resumed(cfg)
    assert straight == resumed
    ckpt = list_checkpoints(tmp_path / "straight" / "checkpoints")[-1]
    assert (ckpt / "adapter_model.safetensors").is_file() and not (ckpt / "model.safetensors").exists()
    assert json.loads((ckpt / "adapter_config.json").read_text())["r"] == 4
    # peft opens the checkpoint folder as an adapter of the base
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(build_tiny_model(len(build_char_tokenizer())), str(ckpt))
    merged = build_tiny_model(len(build_char_tokenizer()))
    load_weights(ckpt, merged)
    ids = torch.randint(3, 40, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, peft_model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(merged(input_ids=ids).logits,
                                  build_tiny_model(len(build_char_tokenizer()))(input_ids=ids).logits)


def test_bf16_autocast_log_probs_are_close_to_fp32_and_train():
    model = build_tiny_model(len(build_char_tokenizer()), hidden_size=128, num_layers=2, seed=0)
    g = torch.Generator().manual_seed(0)
    rows = [Row.sampled(torch.randint(3, 40, (5,), generator=g).tolist(), torch.randint(3, 40, (6,), generator=g).tolist(),
                        [-1.0] * 6) for _ in range(4)]
    batch = build_batch(rows, torch.randn(4, generator=g), pad_id=2)
    fp32, _ = completion_logprobs(model, batch)
    bf16, _ = completion_logprobs(model, batch, autocast=torch.bfloat16)
    assert bf16.dtype == torch.float32
    gap = (bf16 - fp32).abs()[batch.mask > 0]
    assert 0 < gap.max() < 0.1  # bf16 rounding, not a different function
    bf16.sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


def test_bf16_run_reports_its_trainer_engine_gap(tiny_cfg, make_job, tmp_path):
    job = make_job(tiny_cfg(train={"precision": "bf16"}, rollout={"logprob_check": "off"}), tmp_path / "run")
    rec, _ = job.train_step()
    assert 0 < rec["logprob_mismatch"] < 0.1


def test_device_settings_are_checked_at_load_and_resolved_per_process(tiny_cfg):
    with pytest.raises(ConfigError, match="model.device.*auto, cpu, cuda, cuda:N"):
        tiny_cfg(model={"device": "gpu"})
    with pytest.raises(ConfigError, match="device 'tpu'"):
        tiny_cfg(runtime={"learner": {"device": "tpu"}})
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="model.device='cuda'.*no CUDA device"):
            resolve_device("cuda")


def test_data_parallel_ranks_need_ray_and_no_streaming(tiny_cfg):
    from rollmill.checks import check_config

    with pytest.raises(ConfigError, match="runtime.learner.ranks.*runtime.backend"):
        check_config(tiny_cfg(runtime={"learner": {"ranks": 2}}))
    with pytest.raises(ConfigError, match="streamed"):
        check_config(tiny_cfg(runtime={"backend": "ray", "learner": {"ranks": 2}, "streamed_training": True}))


@cuda
def test_cuda_learner_and_engine_run_a_step(tiny_cfg, make_job, tmp_path):
    job = make_job(tiny_cfg(model={"device": "cuda"}), tmp_path / "run")
    assert job.roles.learner.model.device.type == "cuda"
    assert job.roles.workers[0].engine.name == "hf_generic"  # hf's fast path is the CPU's
    rec, _ = job.train_step()
    assert rec["logprob_mismatch"] < 1e-3
    assert rec["memory/peak_gib"] > 0


@cuda
def test_cuda_bf16_lora_step(tiny_cfg, make_job, tmp_path):
    job = make_job(tiny_cfg(model={"device": "cuda", "lora": LORA}, train={"precision": "bf16"},
                            rollout={"logprob_check": "off"}), tmp_path / "run")
    rec, _ = job.train_step()
    assert rec["grad_norm"] > 0


def test_export_writes_a_transformers_folder_with_the_adapter_merged(tiny_cfg, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rollmill.cli import main
    from rollmill.runtime import train

    cfg = tiny_cfg(model={"lora": LORA}, train={"lr": 5e-2, "steps": 2}, eval={"before": False, "every": 0})
    train(cfg, tmp_path / "run")
    ckpt = list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "out")]) == 0
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert AutoTokenizer.from_pretrained(tmp_path / "out").pad_token is not None
    merged = build_tiny_model(len(build_char_tokenizer()))
    load_weights(ckpt, merged)
    ids = torch.randint(3, 40, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=ids).logits, merged(input_ids=ids).logits)
    assert main(["export", str(ckpt), str(tmp_path / "out")]) == 2  # never over an existing model

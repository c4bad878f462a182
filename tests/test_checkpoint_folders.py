"""Every checkpoint folder is a transformers model folder: plain `from_pretrained` opens it (a LoRA one
through its base, or with peft), and greedy decoding from it gives the tokens rollmill's engine gives."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from rollmill.cli import main
from rollmill.models import build_char_tokenizer, build_tiny_model, load_model
from rollmill.rollout.build import build_engine
from rollmill.rollout.engine import SamplingParams
from rollmill.runtime import train
from rollmill.train.checkpoint import MODEL_FILE, list_checkpoints, load_weights, read_model_file, tied_names

LORA = {"rank": 4, "target_modules": ["q_proj", "v_proj", "up_proj"]}
NEW_TOKENS = 12
QUICK = {"train": {"steps": 2, "lr": 5e-2}, "checkpoint": {"every": 2}, "eval": {"before": False, "every": 0}}


def prompt_ids(tokenizer) -> list[int]:
    messages = [{"role": "user", "content": "What is 3 + 4?"}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)


def engine_greedy(cfg, checkpoint) -> tuple[list[int], torch.Tensor]:
    """The tokens rollmill's own engine decodes greedily from `checkpoint`'s weights (loaded as `rollmill eval`
    loads them), and the logits of that model over the prompt and those tokens."""
    model, tokenizer = load_model(cfg.model)
    load_weights(checkpoint, model)
    engine = build_engine(cfg.rollout, model, tokenizer)
    sampling = SamplingParams(temperature=0.0, max_new_tokens=NEW_TOKENS)
    tokens = engine.generate([prompt_ids(tokenizer)], sampling, seed=0)[0].token_ids
    return tokens, logits(model, prompt_ids(tokenizer) + tokens)


def logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits


def assert_decodes_as_the_engine(model, tokenizer, expected: tuple[list[int], torch.Tensor]) -> None:
    """`model.generate` greedy gives the engine's tokens, and the model the same logits along the way (a
    tiny random policy tends to repeat one token, so the logits are the finer check)."""
    tokens, expected_logits = expected
    ids = torch.tensor([prompt_ids(tokenizer)])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW_TOKENS,
                             pad_token_id=tokenizer.pad_token_id)
    assert out[0, ids.shape[1]:].tolist() == tokens
    torch.testing.assert_close(logits(model, out[0].tolist()), expected_logits, rtol=1e-5, atol=1e-5)


def trained(tiny_cfg, tmp_path, **sections):
    cfg = tiny_cfg(**{**QUICK, **sections})
    train(cfg, tmp_path / "run")
    return cfg, list_checkpoints(tmp_path / "run" / "checkpoints")[-1]


def test_a_checkpoint_and_its_export_open_in_plain_transformers_and_decode_as_the_engine(tiny_cfg, tmp_path):
    cfg, ckpt = trained(tiny_cfg, tmp_path)
    expected = engine_greedy(cfg, ckpt)
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "exported")]) == 0
    initial = load_model(cfg.model)[0].state_dict()
    for folder in (ckpt, tmp_path / "exported"):
        model = AutoModelForCausalLM.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        assert prompt_ids(tokenizer) == prompt_ids(build_char_tokenizer())
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied again
        assert not torch.equal(model.model.embed_tokens.weight, initial["model.embed_tokens.weight"])  # trained
        assert_decodes_as_the_engine(model, tokenizer, expected)
    stored = load_file(str(ckpt / MODEL_FILE))
    assert "model.embed_tokens.weight" in stored and "lm_head.weight" not in stored  # as save_pretrained stores it
    assert json.loads((ckpt / "config.json").read_text())["dtype"] == "float32"
    assert (ckpt / "generation_config.json").is_file()


def test_a_lora_checkpoint_opens_over_its_base_with_transformers_or_peft(tiny_cfg, tmp_path):
    from peft import PeftModel

    base = tmp_path / "base"
    model, tokenizer = load_model(tiny_cfg().model)
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    cfg, ckpt = trained(tiny_cfg, tmp_path, model={"source": "hf_dir", "path": str(base), "lora": LORA})
    assert not (ckpt / "config.json").exists()  # else transformers would look for the base's weights here
    assert json.loads((ckpt / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base.resolve())
    expected = engine_greedy(cfg, ckpt)
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    # transformers loads the base adapter_config.json names and puts the adapter on it
    assert_decodes_as_the_engine(AutoModelForCausalLM.from_pretrained(ckpt), tokenizer, expected)
    with_peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), ckpt)
    assert_decodes_as_the_engine(with_peft, tokenizer, expected)
    assert main(["export", str(ckpt), str(tmp_path / "exported")]) == 0
    assert_decodes_as_the_engine(AutoModelForCausalLM.from_pretrained(tmp_path / "exported"), tokenizer, expected)
    assert not torch.allclose(logits(AutoModelForCausalLM.from_pretrained(base), expected[0]),
                              logits(with_peft, expected[0]))  # the adapter was trained: not the base's function


def test_a_checkpoint_that_stored_the_tied_embedding_under_its_other_name_still_resumes(tmp_path):
    model = build_tiny_model(len(build_char_tokenizer()), seed=3)
    tied = tied_names(model)
    assert tied == {"lm_head.weight": "model.embed_tokens.weight"}
    old = {k: v.contiguous() for k, v in model.state_dict().items() if k != "model.embed_tokens.weight"}
    save_file(old, str(tmp_path / MODEL_FILE))
    state = read_model_file(tmp_path, tied)
    assert set(state) == set(model.state_dict()) - set(tied)
    assert torch.equal(state["model.embed_tokens.weight"], model.model.embed_tokens.weight)

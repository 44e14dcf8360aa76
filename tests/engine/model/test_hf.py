"""Drop-in with transformers' openai-gpt: same weights → same logits, both directions."""

import json

import pytest
import torch

from engine import GPT1, GPT1Config

transformers = pytest.importorskip("transformers")

TOL = 1e-5  # fp32, same math, different op order


def tiny_config():
    return GPT1Config(n_layer=2, n_embd=32, n_head=4, n_positions=24, vocab_size=101)


def max_diff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_ours_to_hf(tmp_path, fused):
    torch.manual_seed(0)
    model = GPT1(tiny_config(), fused=fused).eval()
    model.save_pretrained(tmp_path)
    hf = transformers.OpenAIGPTLMHeadModel.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 101, (2, 19))
    with torch.no_grad():
        assert max_diff(model(ids).logits, hf(ids).logits) <= TOL


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_hf_to_ours(tmp_path, fused):
    torch.manual_seed(0)
    hf_cfg = transformers.OpenAIGPTConfig(n_layer=2, n_embd=32, n_head=4, n_positions=24, vocab_size=101)
    hf = transformers.OpenAIGPTLMHeadModel(hf_cfg).eval()
    hf.save_pretrained(tmp_path)
    model = GPT1.from_pretrained(tmp_path, fused=fused).eval()
    assert model.config.n_inner == 128 and model.fused == fused
    ids = torch.randint(0, 101, (3, 24))
    with torch.no_grad():
        assert max_diff(model(ids).logits, hf(ids).logits) <= TOL


def test_pytorch_model_bin_with_prefix(tmp_path):
    torch.manual_seed(0)
    hf = transformers.OpenAIGPTLMHeadModel(
        transformers.OpenAIGPTConfig(n_layer=1, n_embd=16, n_head=2, n_positions=8, vocab_size=50)
    ).eval()
    (tmp_path / "config.json").write_text(hf.config.to_json_string())
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")  # keys carry "transformer."
    model = GPT1.from_pretrained(tmp_path, fused=False).eval()
    ids = torch.randint(0, 50, (1, 8))
    with torch.no_grad():
        assert max_diff(model(ids).logits, hf(ids).logits) <= TOL


def test_save_is_complete_and_leaves_no_temp_files(tmp_path):
    model = GPT1(tiny_config(), fused=False)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "openai-gpt" and cfg["n_inner"] == 128


def test_bad_checkpoints_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        GPT1.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        GPT1.from_pretrained(tmp_path)
    tiny_config().to_hf_dict()
    (tmp_path / "config.json").write_text(json.dumps(tiny_config().to_hf_dict()))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        GPT1.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="safetensors"):
        GPT1.from_pretrained(tmp_path)
    GPT1(tiny_config(), fused=False).save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**tiny_config().to_hf_dict(), "n_layer": 3}))
    with pytest.raises(ValueError, match="n_layer is 3, the weights hold 2 layers"):
        GPT1.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**tiny_config().to_hf_dict(), "vocab_size": 102}))
    with pytest.raises(ValueError, match="tokens_embed.weight has shape"):
        GPT1.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        GPT1.from_pretrained(tmp_path)


def test_a_huge_config_is_refused_before_anything_is_allocated(tmp_path):
    """12.8 TB of embedding: building the model first fails in the allocator (RuntimeError) or
    exhausts memory; checking the config against the weights' shapes first is a ValueError."""
    GPT1(tiny_config(), fused=False).save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**tiny_config().to_hf_dict(), "vocab_size": 100_000_000_000}))
    with pytest.raises(
        ValueError, match="tokens_embed.weight has shape \\(101, 32\\), the config implies \\(100000000000, 32\\)"
    ):
        GPT1.from_pretrained(tmp_path, fused=False)


def test_a_config_with_a_million_layers_is_refused_at_once(tmp_path):
    """Even a meta-device model of 10**6 blocks takes minutes and gigabytes of Python objects."""
    GPT1(tiny_config(), fused=False).save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**tiny_config().to_hf_dict(), "n_layer": 10**6}))
    with pytest.raises(ValueError, match="n_layer is 1000000, the weights hold 2 layers"):
        GPT1.from_pretrained(tmp_path, fused=False)


@pytest.mark.parametrize(
    "field, value",
    [
        ("n_layer", "2"),
        ("n_head", None),
        ("n_embd", [32]),
        ("vocab_size", 1e11),
        ("afn", ["gelu"]),
        ("layer_norm_epsilon", "1e-5"),
        ("initializer_range", None),
        ("resid_pdrop", [0.1]),
        ("attn_pdrop", True),
        ("layer_norm_epsilon", True),
    ],
)
def test_config_values_of_the_wrong_type_name_the_file_and_field(tmp_path, field, value):
    GPT1(tiny_config(), fused=False).save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**tiny_config().to_hf_dict(), field: value}))
    with pytest.raises(ValueError, match=f"config.json: GPT1Config.{field} "):
        GPT1.from_pretrained(tmp_path, fused=False)

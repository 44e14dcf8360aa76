import dataclasses

import pytest
import torch

from engine import GPT1, GPT1Config
from engine.model.config import PRESETS


def test_defaults_are_the_paper_model():
    c = GPT1Config()
    assert (c.vocab_size, c.n_positions, c.n_embd, c.n_layer, c.n_head, c.n_inner) == (40478, 512, 768, 12, 12, 3072)
    assert c.afn == "gelu" and c.gelu_approximate == "tanh"  # OpenAI's tanh GELU
    assert (c.resid_pdrop, c.embd_pdrop, c.attn_pdrop) == (0.1, 0.1, 0.1)
    assert c.layer_norm_epsilon == 1e-5 and c.initializer_range == 0.02


def test_gpt1_preset_parameter_count():
    cfg = GPT1Config.from_name("gpt1")
    assert cfg.num_parameters() == 116_534_784
    with torch.device("meta"):  # count without allocating 466 MB
        model = GPT1(cfg, fused=False)
    assert sum(p.numel() for p in model.parameters()) == 116_534_784


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_count_matches_model(name):
    cfg = GPT1Config.from_name(name)
    with torch.device("meta"):
        model = GPT1(cfg, fused=False)
    assert sum(p.numel() for p in model.parameters()) == cfg.num_parameters()


def test_preset_overrides_and_unknown_name():
    assert GPT1Config.from_name("gpt1-small", vocab_size=1000).vocab_size == 1000
    with pytest.raises(ValueError, match="unknown preset 'gpt2'"):
        GPT1Config.from_name("gpt2")


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(n_embd=100, n_head=12), "n_embd"),
        (dict(n_layer=0), "n_layer"),
        (dict(vocab_size=-5), "vocab_size"),
        (dict(n_positions=1.5), "n_positions"),
        (dict(n_inner=0), "n_inner"),
        (dict(resid_pdrop=1.0), "resid_pdrop"),
        (dict(attn_pdrop=-0.1), "attn_pdrop"),
        (dict(embd_pdrop=2), "embd_pdrop"),
        (dict(afn="relu6"), "afn"),
        (dict(layer_norm_epsilon=0.0), "layer_norm_epsilon"),
        (dict(initializer_range=-1.0), "initializer_range"),
        (dict(initializer_range=float("inf")), "initializer_range"),
        (dict(layer_norm_epsilon=True), "layer_norm_epsilon"),  # a JSON true is not 1
        (dict(resid_pdrop=True), "resid_pdrop"),
        (dict(afn=["gelu"]), "afn"),  # unhashable: was a TypeError
        (dict(layer_norm_epsilon="1e-5"), "layer_norm_epsilon"),  # was a TypeError from '>'
    ],
)
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        GPT1Config(**kwargs)


def test_every_field_is_documented():
    for f in dataclasses.fields(GPT1Config):
        assert f.metadata.get("help"), f"GPT1Config.{f.name} has no help text"


def test_hf_dict_round_trip_and_hf_config_without_n_inner():
    c = GPT1Config.from_name("gpt1-small")
    assert GPT1Config.from_dict(c.to_hf_dict()) == c
    hf = {
        "model_type": "openai-gpt",
        "n_embd": 128,
        "n_head": 4,
        "n_layer": 2,
        "afn": "gelu",
        "summary_type": "cls_index",
    }
    assert GPT1Config.from_dict(hf).n_inner == 512  # openai-gpt's FFN is 4 * n_embd

"""embd_dropout="matrix" (OpenAI's code): the whole embedding tables are dropped, one mask per
pass, and the tied LM head reads the dropped token table; "sum" (transformers) drops the sum."""

import pytest
import torch
import torch.nn.functional as F

from engine import GPT1, GPT1Config
from engine.model.reference import ReferenceGPT1
from helpers import assert_close

CFG = dict(
    n_layer=2, n_embd=48, n_head=4, n_positions=32, vocab_size=97, resid_pdrop=0.0, attn_pdrop=0.0, embd_pdrop=0.3
)


def spec_loss(model: torch.nn.Module, ids: torch.Tensor, seed: int) -> torch.Tensor:
    """OpenAI's embed(): we = dropout(we) over the whole table, h = we[x] + we[pos], logits = h_L · weᵀ."""
    torch.manual_seed(seed)
    p = CFG["embd_pdrop"]
    wte = F.dropout(model.tokens_embed.weight, p, True)
    wpe = F.dropout(model.positions_embed.weight, p, True)
    x = wte[ids] + wpe[torch.arange(ids.shape[1])]
    for block in model.h:
        x = block(x)
    logits = x @ wte.t()
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_matrix_dropout_is_openais_and_reaches_the_head(fused):
    torch.manual_seed(0)
    cfg = GPT1Config(**CFG, embd_dropout="matrix")
    model = GPT1(cfg, fused=fused).train()
    spec = ReferenceGPT1(cfg).train()
    spec.load_state_dict(model.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (3, 17))
    torch.manual_seed(7)
    loss = model(ids, labels=ids).loss
    loss.backward()
    expected = spec_loss(spec, ids, seed=7)
    expected.backward()
    assert_close(loss, expected, "loss")
    for (name, p), q in zip(model.named_parameters(), spec.parameters()):
        assert_close(p.grad, q.grad, f"grad {name}")
    torch.manual_seed(7)
    assert_close(spec.loss(ids, ids), expected.detach(), "ReferenceGPT1 loss")


def test_sum_and_matrix_differ_only_in_training():
    torch.manual_seed(0)
    ids = torch.randint(0, 97, (2, 9))
    sums = GPT1(GPT1Config(**CFG), fused=False)
    matrix = GPT1(GPT1Config(**CFG, embd_dropout="matrix"), fused=False)
    matrix.load_state_dict(sums.state_dict())
    sums.eval(), matrix.eval()
    assert torch.equal(sums(ids).logits, matrix(ids).logits)  # no dropout at eval: identical
    sums.train(), matrix.train()
    torch.manual_seed(1)
    a = sums(ids, labels=ids).loss
    torch.manual_seed(1)
    b = matrix(ids, labels=ids).loss
    assert a != b


def test_config_round_trip_and_validation(tmp_path):
    cfg = GPT1Config(**CFG, embd_dropout="matrix")
    GPT1(cfg, fused=False).save_pretrained(tmp_path)
    assert GPT1.from_pretrained(tmp_path, fused=False).config.embd_dropout == "matrix"
    with pytest.raises(ValueError, match="embd_dropout"):
        GPT1Config(**CFG, embd_dropout="tokens")

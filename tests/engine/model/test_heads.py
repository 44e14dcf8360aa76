"""Task heads: the shared dropout mask, the similarity sum, the extract-token read-out and the
combined objective L3 = L2 + λ·L1."""

import pytest
import torch
import torch.nn.functional as F

from engine import GPT1, GPT1Config
from engine.data.transforms import Encoded, collate
from engine.model.heads import GPT1ForTask, SharedDropout, TaskHead, combine_losses

C = 16


def test_shared_dropout_one_mask_per_example():
    torch.manual_seed(0)
    drop = SharedDropout(0.5).train()
    x = torch.ones(64, 4, C)
    y = drop(x)
    assert torch.equal(y, y[:, :1].expand_as(y))  # every choice of an example sees the same mask
    assert set(y.unique().tolist()) == {0.0, 2.0}  # kept values scaled by 1 / (1 - p)
    assert not torch.equal(y[0], y[1])  # examples draw their own masks
    assert torch.equal(drop.eval()(x), x)


def test_multiple_choice_head_shares_the_mask_across_choices():
    torch.manual_seed(0)
    head = TaskHead("multiple_choice", C, pdrop=0.5).train()
    h = torch.randn(8, 1, C).expand(8, 3, C)  # three identical choices
    scores = head(h)
    assert scores.shape == (8, 3)
    # independent masks would give each identical choice its own score
    assert torch.allclose(scores, scores[:, :1].expand_as(scores))
    head.eval()
    assert torch.allclose(head(h), (h @ head.linear.weight.t()).squeeze(-1) + head.linear.bias)


def test_similarity_sums_both_orders_before_the_linear_layer():
    torch.manual_seed(0)
    head = TaskHead("similarity", C, n_labels=2).eval()
    h = torch.randn(5, 2, C)
    expected = F.linear(h[:, 0] + h[:, 1], head.linear.weight, head.linear.bias)
    assert torch.allclose(head(h), expected, atol=1e-6)
    assert torch.allclose(head(h.flip(1)), head(h), atol=1e-6)  # order-free by construction
    # train mode: one mask on the sum = the same mask on each order
    head.train()
    torch.manual_seed(1)
    out = head(h)
    torch.manual_seed(1)
    keep = torch.empty(5, 1, C).bernoulli_(0.9) / 0.9
    assert torch.allclose(
        out, F.linear((h[:, :1] * keep + h[:, 1:] * keep)[:, 0], head.linear.weight, head.linear.bias), atol=1e-6
    )


def test_classification_and_regression_heads():
    torch.manual_seed(0)
    cls = TaskHead("classification", C, n_labels=3).eval()
    h = torch.randn(4, 1, C)
    logits = cls(h)
    assert logits.shape == (4, 3)
    labels = torch.tensor([0, 2, 1, 1])
    assert torch.allclose(cls.loss(logits, labels), F.cross_entropy(logits, labels))
    assert torch.equal(cls.predict(logits), logits.argmax(-1))

    reg = TaskHead("regression", C).eval()
    reg.set_target_stats(torch.tensor([1.0, 2.0, 3.0]))  # mean 2, std 1
    h2 = torch.randn(4, 2, C)
    out = reg(h2)
    assert out.shape == (4,)
    scores = torch.tensor([0.0, 5.0, 2.0, 1.0])
    assert torch.allclose(reg.loss(out, scores), F.mse_loss(out, scores - 2.0))
    assert torch.allclose(reg.predict(out), out + 2.0)
    with pytest.raises(ValueError, match="expects the 2 orders"):
        reg(torch.randn(4, 1, C))
    with pytest.raises(ValueError, match="n_labels >= 2"):
        TaskHead("entailment", C, n_labels=1)


def test_combine_losses():
    l2, l1 = torch.tensor(1.25), torch.tensor(3.0)
    assert combine_losses(l2, l1, 0.5).item() == 1.25 + 0.5 * 3.0
    assert combine_losses(l2, l1, 0.0) is l2
    assert combine_losses(l2, None, 0.5) is l2


def _tiny_model(kind: str, n_labels: int, lm_coef: float) -> GPT1ForTask:
    torch.manual_seed(0)
    cfg = GPT1Config(vocab_size=40, n_positions=16, n_embd=C, n_layer=2, n_head=2)
    return GPT1ForTask(GPT1(cfg, fused=False), TaskHead(kind, C, n_labels), lm_coef=lm_coef).eval()


def _batch():
    items = [
        Encoded(((30, 1, 2, 31, 5, 32), (30, 1, 2, 31, 6, 7, 32)), 1),
        Encoded(((30, 3, 31, 8, 32), (30, 3, 31, 9, 32)), 0),
    ]
    return collate(items, pad_id=33)


def test_task_model_loss_is_task_plus_lambda_lm():
    model = _tiny_model("multiple_choice", 1, lm_coef=0.5)
    b = _batch()
    out = model(b.input_ids, b.extract, b.labels, b.lm_labels)
    B, S, T = b.input_ids.shape
    body = model.body(b.input_ids.view(B * S, T), labels=b.lm_labels.view(B * S, T))
    assert torch.allclose(out.lm_loss, body.loss)  # L1: LM loss on the transformed sequences, pads ignored
    h = body.hidden_states[torch.arange(B * S), b.extract.view(-1)].view(B, S, C)
    assert torch.allclose(out.out, model.head(h), atol=1e-6)  # read at the extract token
    assert torch.allclose(out.task_loss, F.cross_entropy(model.head(h), b.labels), atol=1e-6)
    assert torch.allclose(out.loss, out.task_loss + 0.5 * out.lm_loss)
    out.loss.backward()
    assert model.head.linear.weight.grad.abs().sum() > 0 and model.body.h[0].attn.c_attn.weight.grad.abs().sum() > 0

    no_lm = _tiny_model("multiple_choice", 1, lm_coef=0.0)
    out0 = no_lm(b.input_ids, b.extract, b.labels, b.lm_labels)
    assert out0.lm_loss is None and torch.equal(out0.loss, out0.task_loss)


def test_pads_after_the_extract_token_change_nothing():
    model = _tiny_model("multiple_choice", 1, lm_coef=0.5)
    b = _batch()
    wider = torch.cat([b.input_ids, torch.full((*b.input_ids.shape[:2], 4), 33)], dim=-1)
    wider_lm = torch.cat([b.lm_labels, torch.full((*b.lm_labels.shape[:2], 4), -100)], dim=-1)
    a = model(b.input_ids, b.extract, b.labels, b.lm_labels)
    c = model(wider, b.extract, b.labels, wider_lm)
    assert torch.allclose(a.out, c.out, atol=1e-5) and torch.allclose(a.lm_loss, c.lm_loss, atol=1e-5)


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_lm_loss_averaged_per_sequence_as_openai(fused):
    """OpenAI's L1: sum(loss·M)/sum(M) per sequence, then the mean over sequences (train.py);
    every gradient matches that formula written with per-token losses."""
    torch.manual_seed(0)
    cfg = GPT1Config(vocab_size=40, n_positions=16, n_embd=C, n_layer=2, n_head=2)
    body = GPT1(cfg, fused=fused).eval()
    spec = GPT1(cfg, fused=False).eval()
    spec.load_state_dict(body.state_dict())
    model = GPT1ForTask(body, TaskHead("multiple_choice", C, 1), lm_coef=0.5, lm_average="sequence").eval()
    b = _batch()
    B, S, T = b.input_ids.shape
    ids, lm = b.input_ids.view(B * S, T), b.lm_labels.view(B * S, T)
    lm = lm.clone()
    lm[1] = -100  # a sequence with no counted token: left out of the mean, no NaN
    out = model(b.input_ids, b.extract, b.labels, lm.view(B, S, T))
    logits = spec(ids, return_logits=True).logits[:, :-1]
    tok = F.cross_entropy(
        logits.reshape(-1, cfg.vocab_size), lm[:, 1:].reshape(-1), ignore_index=-100, reduction="none"
    ).view(B * S, T - 1)
    m = (lm[:, 1:] != -100).float()
    rows = m.sum(1) > 0
    expected = ((tok * m).sum(1)[rows] / m.sum(1)[rows]).mean()
    assert torch.allclose(out.lm_loss, expected, atol=1e-6)
    assert not torch.allclose(out.lm_loss, spec(ids, labels=lm).loss, atol=1e-4)  # not the token mean
    out.lm_loss.backward()
    expected.backward()
    for (name, p), q in zip(body.named_parameters(), spec.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5), name
    with pytest.raises(ValueError, match="lm_average"):
        GPT1ForTask(body, TaskHead("multiple_choice", C, 1), lm_average="example")

"""GPT1 (fused and reference paths) against ReferenceGPT1, the spec; inputs; generation."""

import pytest
import torch
import torch.nn.functional as F

from engine import GPT1, GPT1Config
from engine.model.reference import ReferenceGPT1
from helpers import assert_close

CFG = dict(n_layer=2, n_embd=48, n_head=4, n_positions=32, vocab_size=97)  # head_dim 12, prime vocab


def make_pair(fused, **overrides):
    torch.manual_seed(0)
    cfg = GPT1Config(**{**CFG, **overrides})
    ref = ReferenceGPT1(cfg)
    model = GPT1(cfg, fused=fused)
    model.load_state_dict(ref.state_dict())
    return ref.eval(), model.eval(), cfg


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
@pytest.mark.parametrize("T", [1, 13, 32])
def test_logits_loss_and_every_gradient_match_reference(fused, T):
    ref, model, cfg = make_pair(fused)
    ids = torch.randint(0, cfg.vocab_size, (3, T))
    labels = ids.clone()
    labels[0, : T // 2] = -100  # ignored positions
    logits_ref = ref(ids)
    out = model(ids, return_logits=True)
    assert_close(out.logits, logits_ref, "logits")
    if T == 1:
        return  # a single token predicts nothing: no loss
    loss_ref = ref.loss(ids, labels)
    loss_ref.backward()
    loss = model(ids, labels=labels).loss
    loss.backward()
    assert_close(loss, loss_ref, "loss")
    grads_ref = {n: p.grad for n, p in ref.named_parameters()}
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert_close(p.grad, grads_ref[name], f"grad {name}")


def test_labels_are_shifted_targets_are_not():
    _, model, cfg = make_pair(False)
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    shifted = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)
    torch.testing.assert_close(model(ids, labels=ids).loss, model(ids, targets=shifted).loss, rtol=0, atol=0)
    logits = model(ids).logits
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, cfg.vocab_size), ids[:, 1:].reshape(-1))
    assert_close(model(ids, labels=ids).loss, expected, "loss")


def test_outputs_and_hidden_states():
    _, model, cfg = make_pair(False)
    ids = torch.randint(0, cfg.vocab_size, (2, 5))
    out = model(ids)
    assert out.loss is None and out.logits.shape == (2, 5, cfg.vocab_size)
    assert out.hidden_states.shape == (2, 5, cfg.n_embd)
    out = model(ids, labels=ids)
    assert out.logits is None and out.loss.ndim == 0  # the fused loss never builds logits
    assert model(ids, labels=ids, return_logits=True).logits.shape == (2, 5, cfg.vocab_size)


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_dropout_is_active_in_training_and_seeded(fused):
    _, model, cfg = make_pair(fused)
    model.train()
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    torch.manual_seed(1)
    a = model(ids, labels=ids).loss
    torch.manual_seed(1)
    b = model(ids, labels=ids).loss
    c = model(ids, labels=ids).loss
    assert torch.equal(a, b), "same torch seed must give the same dropout"
    assert not torch.equal(a, c), "dropout must change between steps"


@pytest.mark.parametrize(
    "ids, match",
    [
        (torch.tensor([[1, 2, 97]]), "token id 97, outside \\[0, 97\\)"),
        (torch.tensor([[1, -1]]), "token id -1"),
        (torch.zeros(1, 33, dtype=torch.long), "seq_len 33, longer than n_positions=32"),
        (torch.zeros(1, 4), "int64 or int32"),
        (torch.zeros(4, dtype=torch.long), "2-D"),
        (torch.zeros(1, 2, 3, dtype=torch.long), "2-D"),
        (torch.zeros(1, 0, dtype=torch.long), "empty"),
    ],
)
def test_bad_input_ids_raise_value_error(ids, match):
    _, model, _ = make_pair(False)
    with pytest.raises(ValueError, match=match):
        model(ids)


def test_bad_labels_raise_value_error():
    _, model, _ = make_pair(False)
    ids = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="labels holds token id 500"):
        model(ids, labels=torch.full((2, 4), 500))
    with pytest.raises(ValueError, match="labels shape"):
        model(ids, labels=torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="not both"):
        model(ids, labels=ids, targets=ids)
    with pytest.raises(TypeError):
        GPT1({"n_layer": 2})


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_generate_with_kv_cache_equals_full_recompute(fused):
    _, model, cfg = make_pair(fused)
    prompt = torch.randint(0, cfg.vocab_size, (2, 5))
    out = model.generate(prompt, max_new_tokens=8, temperature=0)
    assert out.shape == (2, 13) and torch.equal(out[:, :5], prompt)
    seq = prompt
    for _ in range(8):  # greedy without a cache: the whole sequence every step
        nxt = model(seq).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out, seq)
    assert torch.equal(model.generate(prompt, 8, top_k=1), seq)  # top-1 sampling is greedy


def test_generate_sampling_and_arguments():
    _, model, cfg = make_pair(False)
    model.train()
    prompt = torch.randint(0, cfg.vocab_size, (1, 3))
    g = torch.Generator().manual_seed(0)
    a = model.generate(prompt, 10, temperature=1.0, top_k=5, generator=g)
    g.manual_seed(0)
    b = model.generate(prompt, 10, temperature=1.0, top_k=5, generator=g)
    assert torch.equal(a, b) and model.training, "seeded sampling is reproducible; the mode is restored"
    with pytest.raises(ValueError, match="exceeds n_positions=32"):
        model.generate(prompt, 30)
    with pytest.raises(ValueError, match="top_k"):
        model.generate(prompt, 2, top_k=0)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(prompt, 2, temperature=-1.0)


def test_resize_token_embeddings_keeps_rows():
    _, model, cfg = make_pair(False)
    old = model.tokens_embed.weight.detach().clone()
    model.resize_token_embeddings(cfg.vocab_size + 3)
    assert model.config.vocab_size == cfg.vocab_size + 3 and cfg.vocab_size == 97  # the caller's config is untouched
    assert torch.equal(model.tokens_embed.weight[: cfg.vocab_size], old)
    ids = torch.tensor([[cfg.vocab_size + 2, 0]])
    assert model(ids, labels=ids).loss.isfinite()


@pytest.mark.parametrize("k", [0, 1, 2])
def test_reset_blocks_transfers_embeddings_and_the_first_k_blocks(k):
    torch.manual_seed(0)
    cfg = GPT1Config(**CFG)
    pretrained = GPT1(cfg, fused=False)
    with torch.no_grad():  # make "pretrained" weights unlike a fresh init
        for p in pretrained.parameters():
            p.add_(1.0)
    model = GPT1(cfg, fused=False)
    model.load_state_dict(pretrained.state_dict())
    model.reset_blocks(k)
    before, after = dict(pretrained.named_parameters()), dict(model.named_parameters())
    for name, p in after.items():
        layer = int(name.split(".")[1]) if name.startswith("h.") else None
        if layer is None or layer < k:
            assert torch.equal(p, before[name]), name  # transferred
        elif name.endswith("ln_1.weight") or name.endswith("ln_2.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        elif name.endswith("bias"):
            assert torch.equal(p, torch.zeros_like(p)), name
        else:
            assert abs(p.std().item() - cfg.initializer_range) < 0.01 and abs(p.mean().item()) < 0.01, name
    with pytest.raises(ValueError, match="layers transferred"):
        model.reset_blocks(cfg.n_layer + 1)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(temperature=-0.5), "temperature"),
        (dict(temperature="1.0"), "temperature"),
        (dict(temperature=True), "temperature"),
        (dict(top_k=True), "top_k"),
        (dict(top_k=0), "top_k"),
        (dict(top_k=-3), "top_k"),
        (dict(top_k=2.0), "top_k"),
        (dict(max_new_tokens=True), "max_new_tokens"),
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(max_new_tokens=2.0), "max_new_tokens"),
        (dict(generator=0), "generator"),
    ],
)
def test_generate_rejects_bad_sampling_arguments_by_name(kwargs, name):
    _, model, cfg = make_pair(False)
    prompt = torch.randint(0, cfg.vocab_size, (1, 3))
    args = {"max_new_tokens": 2, **kwargs}
    with pytest.raises(ValueError, match=name):
        model.generate(prompt, **args)
    with pytest.raises(ValueError, match=name):  # checked at the call, before any token is drawn
        model.generate_stream(prompt, **args)


def test_generate_stream_yields_the_tokens_of_generate():
    _, model, cfg = make_pair(False)
    prompt = torch.randint(0, cfg.vocab_size, (2, 4))
    steps = list(model.generate_stream(prompt, 6, temperature=0.7, top_k=9, generator=torch.Generator().manual_seed(3)))
    assert len(steps) == 6 and all(s.shape == (2, 1) for s in steps)
    full = model.generate(prompt, 6, temperature=0.7, top_k=9, generator=torch.Generator().manual_seed(3))
    assert torch.equal(torch.cat([prompt, *steps], dim=1), full)
    assert torch.equal(model.generate(prompt, 0), prompt)

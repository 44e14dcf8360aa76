"""GPT1(fused=True) on CPU as a whole: torch.compile traces it in one graph through the gpt1::
ops, and a 20-step training run follows the reference path's loss curve."""

import torch

from engine import GPT1, GPT1Config
from helpers import assert_close

# dropout off: the two paths draw different masks (Philox in the kernels, torch's RNG in the reference)
CFG = dict(
    n_layer=2, n_embd=64, n_head=4, n_positions=32, vocab_size=101, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
)


def test_torch_compile_fullgraph_traces_the_fused_ops_and_matches_eager():
    torch.manual_seed(0)
    model = GPT1(GPT1Config(**CFG), fused=True)
    ids = torch.randint(0, CFG["vocab_size"], (2, 32))
    eager = model(ids, labels=ids).loss
    eager.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    graphs = []

    def recording_backend(gm, example_inputs):  # Dynamo's graph, before any compiler touches it
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=recording_backend, fullgraph=True)(ids, labels=ids)
    traced = {str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"}
    for op in ("gpt1.attention_fwd", "gpt1.add_layernorm_fwd", "gpt1.linear_gelu_fwd", "gpt1.linear_cross_entropy_fwd"):
        assert any(t.startswith(op) for t in traced), (
            f"{op} is not in the compiled graph: {sorted(t for t in traced if 'gpt1' in t)}"
        )

    torch._dynamo.reset()
    loss = torch.compile(model, fullgraph=True)(ids, labels=ids).loss  # inductor, fused ops as extern kernels
    loss.backward()
    assert_close(loss, eager, "compiled loss")
    for name, p in model.named_parameters():
        assert_close(p.grad, grads[name], f"compiled grad {name}")


def test_twenty_training_steps_follow_the_reference_loss_curve():
    curves = {}
    for fused in (False, True):
        torch.manual_seed(0)
        model = GPT1(GPT1Config(**CFG), fused=fused).train()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
        data = torch.Generator().manual_seed(1)
        batches = torch.randint(0, CFG["vocab_size"], (4, 8, 32), generator=data)  # 4 batches, cycled
        curve = []
        for step in range(20):
            ids = batches[step % 4]
            loss = model(ids, labels=ids).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            curve.append(loss.detach())
        curves[fused] = torch.stack(curve)
    assert curves[True][-1] < curves[True][0] - 0.5, f"the fused run did not train: {curves[True].tolist()}"
    assert_close(curves[True], curves[False], "loss curve, fused vs reference")

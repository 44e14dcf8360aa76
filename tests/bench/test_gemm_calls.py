"""bench/gemm_calls.py: ATen's brgemm, called as the probe calls it, computes the tile's product (either dtype)."""

import pytest
import torch

from bench.gemm_calls import build, compare


@pytest.fixture(scope="module")
def ext():
    return build()


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,n,k", [(64, 256, 64), (48, 32, 80)])
def test_brgemm_and_mm_compute_the_same_product(ext, dtype, m, n, k):
    """A wrong leading dimension, operand order or packing gives a different product, caught here. bf16: mm's
    result is rounded to bf16 once, brgemm's is float, so they differ by at most bf16's half-ulp of the result."""
    r = compare(ext, m, n, k, dtype, iters=2)
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=gen).to(dtype), torch.randn(k, n, generator=gen).to(dtype)
    scale = (a.double() @ b.double()).abs().max().item()
    tol = 2**-8 if dtype == torch.bfloat16 else 1e-6
    assert r["diff"] <= tol * scale
    assert r["mm_us"] > 0 and r["brgemm_us"] > 0

import pytest
import torch

from skmml.mml._heads import FoldedHead, IntegrationHead, QuickGELU


def test_architecture_is_the_reference_block():
    head = IntegrationHead(8)
    names = {name for name, _ in head.named_children()}
    assert names == {"ln_q", "ln_k", "ln_v", "q_proj", "k_proj", "v_proj", "out_proj", "ln_2",
                     "mlp"}
    assert [type(m) for m in head.mlp] == [torch.nn.Linear, QuickGELU, torch.nn.Linear]
    assert head.mlp[0].in_features == 8 and head.mlp[0].out_features == 32
    n_params = sum(p.numel() for p in head.parameters())
    # 4 projections (d*d + d), MLP (d*4d + 4d + 4d*d + d), 4 LayerNorms (2d each).
    assert n_params == 4 * (64 + 8) + (256 + 32 + 256 + 8) + 4 * 16


def test_quick_gelu():
    x = torch.linspace(-3, 3, 7)
    torch.testing.assert_close(QuickGELU()(x), x * torch.sigmoid(1.702 * x))


def test_forward_matches_the_reference_formula():
    torch.manual_seed(0)
    head = IntegrationHead(6)
    query = torch.randn(3, 6)
    memory = torch.randn(10, 6)
    neighbors = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1]])
    keys, values = head.project_memory(memory)
    out, attention = head(query, keys, values, neighbors, return_attention=True)
    mha = torch.nn.MultiheadAttention(6, 1, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([head.q_proj.weight, head.k_proj.weight,
                                            head.v_proj.weight]))
        mha.in_proj_bias.copy_(torch.cat([head.q_proj.bias, head.k_proj.bias, head.v_proj.bias]))
        mha.out_proj.weight.copy_(head.out_proj.weight)
        mha.out_proj.bias.copy_(head.out_proj.bias)
    f = query[:, None]
    knn = memory[neighbors]
    attended, ref_attention = mha(head.ln_q(f), head.ln_k(knn), head.ln_v(knn))
    x = f + attended
    x = x + head.mlp(head.ln_2(x))
    torch.testing.assert_close(out, (x + f)[:, 0])
    torch.testing.assert_close(attention, ref_attention[:, 0])
    torch.testing.assert_close(attention.sum(dim=1), torch.ones(3))


def test_zero_residual_init_starts_as_twice_the_query():
    head = IntegrationHead(5, residual_init="zero")
    query = torch.randn(4, 5)
    keys, values = head.project_memory(torch.randn(7, 5))
    out = head(query, keys, values, torch.randint(0, 7, (4, 3)))
    torch.testing.assert_close(out, 2 * query)
    assert head.is_identity()
    assert not IntegrationHead(5).is_identity()
    # The gates are the only extra parameters: 2 d.
    assert (sum(p.numel() for p in head.parameters())
            == sum(p.numel() for p in IntegrationHead(5).parameters()) + 10)
    out.sum().backward()
    torch.optim.SGD(head.parameters(), lr=0.1).step()
    assert not head.is_identity()
    with pytest.raises(ValueError, match="residual_init"):
        IntegrationHead(5, residual_init="small")


def test_one_adam_step_departs_smoothly_from_the_identity():
    # Unit-norm queries and memory items, as the classifier feeds them: one
    # Adam step at lr 1e-3 must move the output by a small fraction of the
    # query (zero-initialised output layers moved it by several times its norm).
    torch.manual_seed(0)
    d = 512
    unit = lambda n: torch.nn.functional.normalize(torch.randn(n, d), dim=1)  # noqa: E731
    query, memory, target = unit(64), unit(300), unit(64)
    neighbors = torch.randint(0, 300, (64, 16))
    head = IntegrationHead(d, residual_init="zero")
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-3)
    keys, values = head.project_memory(memory)
    loss = -(torch.nn.functional.normalize(head(query, keys, values, neighbors), dim=1)
             * target).sum()
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        keys, values = head.project_memory(memory)
        out = head(query, keys, values, neighbors)
    change = ((out - 2 * query).norm(dim=1) / (2 * query).norm(dim=1)).median()
    assert 0 < change < 0.05


def test_inference_without_gathers_matches_training_computation():
    torch.manual_seed(0)
    head = IntegrationHead(12)
    query, memory = torch.randn(9, 12), torch.randn(30, 12)
    neighbors = torch.randint(0, 30, (9, 5))
    valid = torch.rand(9, 5) > 0.2
    keys, values = head.project_memory(memory)
    out, attention = head(query, keys, values, neighbors, valid, return_attention=True)
    with torch.no_grad():
        fast, fast_attention = head(query, keys, values, neighbors, valid,
                                    return_attention=True)
    torch.testing.assert_close(fast, out.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast_attention, attention.detach(), rtol=1e-5, atol=1e-6)
    assert torch.all(fast_attention[~valid] == 0)


@pytest.mark.parametrize("residual_init", ["default", "zero"])
@pytest.mark.parametrize("sparse", [True, False])
def test_folded_head_matches_the_head(residual_init, sparse):
    torch.manual_seed(0)
    d = 24
    head = IntegrationHead(d, residual_init=residual_init).eval()
    if residual_init == "zero":  # trained gates: non-zero, per channel
        with torch.no_grad():
            head.gate_attention.normal_()
            head.gate_mlp.normal_()
    query, memory = torch.randn(11, d), torch.randn(40, d)
    neighbors = torch.randint(0, 40, (11, 6))
    valid = torch.rand(11, 6) > 0.2
    valid[3] = False  # a query that found no neighbor attends to nothing
    with torch.no_grad():
        out, attention = head(query, *head.project_memory(memory), neighbors, valid,
                              return_attention=True)
    folded = head.fold_memory(memory)
    assert isinstance(folded, FoldedHead)
    assert all(t.dtype == torch.float32 for t in folded.memory_tensors())
    fast, fast_attention = folded(query, neighbors, valid, sparse=sparse)
    torch.testing.assert_close(fast, out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast_attention, attention, rtol=1e-5, atol=1e-6)
    assert torch.all(fast_attention[3] == 0)
    # bfloat16 MLP: its products round to about 2^-8; attention stays float32.
    half, half_attention = folded(query, neighbors, valid, dtype=torch.bfloat16, sparse=sparse)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half_attention, fast_attention)
    assert 0 < (half - fast).abs().max() < 0.05 * fast.abs().max()
    # Under a caller's bfloat16 autocast the cache is float32 all the same.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        again = head.fold_memory(memory)
    for a, b in zip(again.memory_tensors(), folded.memory_tensors()):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b)

"""The memory-modular learner's integration head: one cross-attention block.

The reference block (1 layer, 1 head, pre-LayerNorm with separate norms for
query, key and value)::

    x = f + Attn(LN_q(f), LN_k(m), LN_v(m))
    x = x + MLP(LN_2(x))          # MLP: d -> 4d -> d with QuickGELU
    out = x + f                   # the reference code adds the query again

where ``f`` is the query embedding and ``m`` its retrieved memory items.

Keys and values are projected per *memory item*, not per (query, neighbor)
pair: :meth:`IntegrationHead.project_memory` maps the distinct items a batch
touches once, and :meth:`IntegrationHead.forward` gathers the projections by
index. At inference the projections of the whole memory are computed once and
cached by the classifier, and on a CPU they are read through sparse products
rather than gathered.

Prediction folds the head into that cache (:meth:`IntegrationHead.fold_memory`,
:class:`FoldedHead`): the query projection into the keys and the output
projection into the values, so that per query only the MLP's two products
remain (``8 d^2`` multiply-adds instead of ``10 d^2``), and those
run in bfloat16 where the classifier asks for it.
"""

import math
import warnings

import torch
from torch import nn
from torch.nn import functional as F
from torch.profiler import record_function

#: QuickGELU's slope: ``x * sigmoid(a x) = silu(a x) / a``.
_GELU_SLOPE = 1.702


def _neighbor_pattern(neighbors, weights, n_items):
    """A sparse CSR (batch, n_items) matrix with `weights` at each query's neighbors.

    Inference on a CPU reads the memory through it instead of gathering a
    (batch, k, d) copy of the neighbors' keys and values: the attention
    scores are a sampled product (SDDMM) and the attended values a sparse
    product, about 20x less time than the gathers.
    """
    batch, k = neighbors.shape
    neighbors = neighbors.clamp(min=0)  # a missing neighbor (-1) is masked by `weights`
    crow = torch.arange(0, batch * k + 1, k, device=neighbors.device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, neighbors.reshape(-1), weights.reshape(-1),
                                       size=(batch, n_items), check_invariants=False)


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``, CLIP's GELU approximation."""

    def forward(self, x):
        return x * torch.sigmoid(_GELU_SLOPE * x)


class IntegrationHead(nn.Module):
    """Cross-attention from a query embedding to its retrieved memory items.

    Parameters
    ----------
    dim : int
        Embedding dimension ``d``.
    mlp_ratio : int, default=4
        Hidden width of the MLP, ``mlp_ratio * d``.
    residual_init : {"default", "zero"}, default="default"
        "zero" gates each residual branch with a per-channel scale
        initialised at zero (LayerScale, Touvron et al. 2021), so that the
        untrained head returns ``2 f`` and ranks classes exactly as the
        prototype classifier does. "default" is the reference block, with
        no gates and PyTorch's initialisation.

    Notes
    -----
    Why gates rather than zero-initialised output layers (an earlier
    choice): the query ``f`` has unit norm, while LayerNorm makes the
    attended values and MLP activations ``a`` of norm about ``sqrt(d)``.
    Adam's first step moves every weight of a zero-initialised output layer
    by about ``lr`` with the sign of its gradient ``delta a^T``, so each
    output coordinate moves by about ``lr * ||a||_1 ~ lr * d``: at d = 1280
    and lr = 1e-3 one step moved the head's output by 5x the query's norm
    (median over queries, pretrained EfficientNet-Lite0 features of digits)
    and held-out accuracy fell from 0.83 to 0.50. A zero gate ``g`` instead
    moves by about ``lr`` per channel, scaling an output of entries O(1):
    the same step moved the output by 0.7% of the query's norm, so training
    departs smoothly from the prototype classifier.
    """

    def __init__(self, dim, mlp_ratio=4, residual_init="default"):
        super().__init__()
        self.dim = dim
        self.ln_q = nn.LayerNorm(dim)
        self.ln_k = nn.LayerNorm(dim)
        self.ln_v = nn.LayerNorm(dim)
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim), QuickGELU(), nn.Linear(mlp_ratio * dim, dim)
        )
        if residual_init == "zero":
            self.gate_attention = nn.Parameter(torch.zeros(dim))
            self.gate_mlp = nn.Parameter(torch.zeros(dim))
        elif residual_init == "default":
            self.gate_attention = self.gate_mlp = None
        else:
            raise ValueError(f"residual_init must be 'default' or 'zero', got {residual_init!r}.")

    def is_identity(self):
        """Whether the residual branches are exactly zero, so ``forward`` returns ``2 f``.

        True for an untrained ``residual_init="zero"`` head (both gates
        zero): the classifier then skips the head, and its retrieval, at
        prediction.
        """
        if self.gate_attention is None:
            return False
        return not (torch.any(self.gate_attention) or torch.any(self.gate_mlp))

    def _gated(self, gate, branch):
        return branch if gate is None else gate * branch

    def project_memory(self, items):
        """Keys and values of memory items (n_items, d): two (n_items, d) tensors."""
        return self.k_proj(self.ln_k(items)), self.v_proj(self.ln_v(items))

    def fold_memory(self, items):
        """This head over memory `items` (n_items, d), for prediction: a :class:`FoldedHead`.

        Float32 whatever the caller's autocast; it reads this head's weights,
        so it is valid until they change.
        """
        return FoldedHead(self, items)

    def forward(self, query, keys, values, neighbors, valid=None, return_attention=False):
        """Integrate each query with its neighbors.

        Parameters
        ----------
        query : Tensor of shape (batch, d)
        keys, values : Tensors of shape (n_items, d)
            Projected memory items, from :meth:`project_memory`.
        neighbors : LongTensor of shape (batch, k)
            Rows of `keys` / `values` retrieved for each query.
        valid : BoolTensor of shape (batch, k), default=None
            False where a neighbor is missing (an approximate index found
            fewer than k items): it gets no attention.
        return_attention : bool, default=False
            Also return the attention weights, shape (batch, k).

        Returns
        -------
        out : Tensor of shape (batch, d)
        """
        q = self.q_proj(self.ln_q(query))
        gather = torch.is_grad_enabled() or q.device.type != "cpu"
        # The attention itself (k scores and a weighted sum per query) is
        # cheap: float32 even under bfloat16 autocast, like the keys and values.
        with torch.autocast(q.device.type, enabled=False):
            q = q.to(keys.dtype)
            if gather:
                scores = torch.bmm(keys[neighbors], q[:, :, None])[:, :, 0]
            else:
                pattern = _neighbor_pattern(
                    neighbors, torch.zeros_like(neighbors, dtype=q.dtype), len(keys))
                scores = torch.sparse.sampled_addmm(pattern, q, keys.T, beta=0.0).values()
                scores = scores.view(neighbors.shape)
            scores = scores / math.sqrt(self.dim)
            if valid is not None:
                scores = scores.masked_fill(~valid, -torch.inf)
            attention = scores.softmax(dim=1).nan_to_num(0.0)
            if gather:
                attended = torch.bmm(attention[:, None, :], values[neighbors])[:, 0]
            else:
                attended = _neighbor_pattern(neighbors, attention, len(values)) @ values
        x = query + self._gated(self.gate_attention, self.out_proj(attended))
        x = x + self._gated(self.gate_mlp, self.mlp(self.ln_2(x)))
        out = x + query
        return (out, attention) if return_attention else out


class FoldedHead:
    """An :class:`IntegrationHead` folded into one memory's items, for prediction.

    With ``l = LN_q(f)`` and ``q = W_q l + b_q``, and keys ``k_j = W_k
    LN_k(m_j) + b_k`` and values ``v_j = W_v LN_v(m_j) + b_v`` of the memory
    items, the attention scores and the attended output are linear in the
    items' projections, so the query and output projections fold into
    per-item tensors computed once per memory:

    - scores ``q . k_j = l . (W_q^T k_j) + b_q . k_j``: "keys" ``W_q^T k_j``
      and a "key bias" ``b_q . k_j`` per item, so the query is never
      projected;
    - ``W_o (sum_j a_j v_j) + b_o = sum_j a_j (W_o v_j) + b_o``: "values"
      ``W_o v_j`` (times the attention gate), so the attended output is not
      projected either (the bias stays outside the sum: a query whose
      neighbors are all missing attends to nothing, as in the head).

    Each of the two comes from one product of the items with a fused weight
    (``W_k^T W_q``, ``W_v^T W_o^T``), so the cache costs what the plain keys
    and values cost (``2 n d^2`` multiply-adds, plus ``2 d^3`` once).

    What is left per query is the LayerNorms, its k scores and weighted sum
    (sparse products on a CPU, batched gathers elsewhere) and the MLP, whose
    QuickGELU runs as one in-place SiLU (its slope folded into the products'
    scale factors). The MLP multiplies in the `dtype` of each call
    (bfloat16: float32 accumulation, its weights converted once and kept
    here); everything else is float32. Float32 results equal the head's up
    to float32 rounding (the products are associated differently).

    Parameters
    ----------
    head : IntegrationHead
        The head; this reads its weights, so it is valid until they change.
    items : Tensor of shape (n_items, d)
        The memory items.
    """

    def __init__(self, head, items):
        self.head = head
        self.dim = head.dim
        with torch.no_grad(), torch.autocast(items.device.type, enabled=False):
            items = items.float()
            normed = head.ln_k(items)
            w_q, b_q = head.q_proj.weight, head.q_proj.bias
            w_k, b_k = head.k_proj.weight, head.k_proj.bias
            self.keys = torch.addmm(b_k @ w_q, normed, w_k.T @ w_q)
            self.key_bias = torch.addmv(b_k @ b_q, normed, w_k.T @ b_q)
            del normed
            output = head.out_proj.weight.T
            value_weight = head.v_proj.weight.T @ output
            value_bias = head.v_proj.bias @ output
            self.value_bias = head.out_proj.bias
            if head.gate_attention is not None:
                value_weight *= head.gate_attention
                value_bias *= head.gate_attention
                self.value_bias = head.gate_attention * self.value_bias
            self.values = torch.addmm(value_bias, head.ln_v(items), value_weight)
        self._mlp = {}

    def memory_tensors(self):
        """The per-item tensors, float32: keys (n, d), key bias (n,), values (n, d)."""
        return self.keys, self.key_bias, self.values

    def _mlp_weights(self, dtype):
        """(W_1^T, b_1, W_2^T, b_2) of the MLP in `dtype` (kept per dtype)."""
        weights = self._mlp.get(dtype)
        if weights is None:
            first, last = self.head.mlp[0], self.head.mlp[2]
            weights = tuple(w.detach().to(dtype) for w in (first.weight.T, first.bias,
                                                           last.weight.T, last.bias))
            weights = self._mlp.setdefault(dtype, weights)
        return weights

    @torch.no_grad()
    def __call__(self, query, neighbors, valid=None, dtype=torch.float32, sparse=None):
        """The head's output and attention for `query`, as :meth:`IntegrationHead.forward`.

        Parameters
        ----------
        query : Tensor of shape (batch, d)
        neighbors : LongTensor of shape (batch, k)
            Rows of the memory items retrieved for each query.
        valid : BoolTensor of shape (batch, k), default=None
            False where a neighbor is missing: it gets no attention.
        dtype : torch.dtype, default=torch.float32
            Of the MLP's products.
        sparse : bool, default=None
            Read the neighbors through sparse products (default on a CPU)
            rather than gathers.

        Returns
        -------
        out : Tensor of shape (batch, d), float32
        attention : Tensor of shape (batch, k), float32
        """
        head = self.head
        if sparse is None:
            sparse = query.device.type == "cpu"
        with torch.autocast(query.device.type, enabled=False):
            with record_function("skmml.mml.attention"):
                attention = self._attention(head.ln_q(query), neighbors, valid, sparse)
                x = self._attend(attention, neighbors, sparse)
                x = x.add_(self.value_bias).add_(query)
            with record_function("skmml.mml.mlp"):
                w1, b1, w2, b2 = self._mlp_weights(dtype)
                # QuickGELU(h) = silu(a h) / a: `a` scales the first product, 1 / a the second.
                hidden = torch.addmm(b1, head.ln_2(x).to(dtype), w1,
                                     beta=_GELU_SLOPE, alpha=_GELU_SLOPE)
                hidden = F.silu(hidden, inplace=True)
                mlp = torch.addmm(b2, hidden, w2, alpha=1 / _GELU_SLOPE)
                if head.gate_mlp is not None:
                    mlp = head.gate_mlp * mlp
                out = x.add_(mlp).add_(query)
        return out, attention

    def _attention(self, lq, neighbors, valid, sparse):
        if sparse:
            pattern = _neighbor_pattern(neighbors, self.key_bias[neighbors.clamp(min=0)],
                                        len(self.keys))
            scores = torch.sparse.sampled_addmm(pattern, lq, self.keys.T).values()
            scores = scores.view(neighbors.shape)
        else:
            scores = torch.baddbmm(self.key_bias[neighbors][:, :, None], self.keys[neighbors],
                                   lq[:, :, None])[:, :, 0]
        scores = scores / math.sqrt(self.dim)
        if valid is not None:
            scores = scores.masked_fill(~valid, -torch.inf)
        return scores.softmax(dim=1).nan_to_num(0.0)

    def _attend(self, attention, neighbors, sparse):
        if sparse:
            return _neighbor_pattern(neighbors, attention, len(self.values)) @ self.values
        return torch.bmm(attention[:, None, :], self.values[neighbors])[:, 0]

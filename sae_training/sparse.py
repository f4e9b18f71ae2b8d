"""The training fast path: top-k encode and decode whose backward touches only active concepts.

Autograd through ``VLSAE.encode_topk`` / ``decode_topk`` is correct but slow to train: the
encoder's backward is a dense [h, n] x [n, d] matmul although only k of h entries per row carry
gradient, and plain-indexing gathers are slower than a dense decode on CPU. Here the (row,
concept) pairs become a CSR matrix S [n, h] with k entries per row, and every product is a
sparse one: decode = S W^T, dW = dY^T S, dS = (dY W) sampled at S's pattern (SDDMM), and the
encoder's dC = dS^T x. Only the forward cosine matmul, needed to pick the top k, stays dense.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import Function

from vlsae_hooks.spaces.autoencoder import VLSAE

DISTANCE_EPS = 1e-12
"""Floor under 2 - 2 cos before the square root (keeps its gradient finite)."""
NORM_EPS = 1e-12
"""F.normalize's floor under a norm."""


def _csr(indices: Tensor, values: Tensor, n_cols: int) -> Tensor:
    """[n, k] (sorted) column indices + values -> CSR [n, n_cols] with k entries per row."""
    n, k = indices.shape
    crow = torch.arange(0, n * k + 1, k, device=indices.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(crow, indices.reshape(-1), values.reshape(-1),
                                       (n, n_cols), check_invariants=False)


def _sampled(pattern: Tensor, left: Tensor, right: Tensor) -> Tensor:
    """(left @ right) at the entries of ``pattern`` only, as [n, k] values."""
    out = torch.sparse.sampled_addmm(pattern, left, right, beta=0.0)
    return out.values().view(pattern.shape[0], -1)


class _SparseDecode(Function):
    @staticmethod
    def forward(ctx, values: Tensor, indices: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(values, indices, weight)
        with torch.autocast(weight.device.type, enabled=False):  # sparse kernels want fp32
            return _csr(indices, values.to(weight.dtype), weight.shape[1]) @ weight.T

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        values, indices, weight = ctx.saved_tensors
        grad_out = grad_out.to(weight.dtype).contiguous()
        sparse = _csr(indices, values.to(weight.dtype), weight.shape[1])
        grad_values = grad_weight = None
        with torch.autocast(weight.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                grad_values = _sampled(sparse, grad_out, weight).to(values.dtype)
            if ctx.needs_input_grad[2]:
                grad_weight = (sparse.t() @ grad_out).T
        return grad_values, None, grad_weight


class _GatheredCosine(Function):
    """Returns the precomputed top-k cosines; backward scatters only into the k chosen rows.

    Takes the raw concepts C and does their normalisation's backward itself, in place on the
    one [h, d] gradient: autograd's F.normalize backward makes several [h, d] passes, which
    cost as much as the sparse products here.
    """

    @staticmethod
    def forward(ctx, xn: Tensor, concepts: Tensor, cn: Tensor, norms: Tensor, indices: Tensor,
                cos: Tensor) -> Tensor:
        ctx.save_for_backward(xn, cn, norms, indices)
        return cos.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        xn, cn, norms, indices = ctx.saved_tensors
        sparse = _csr(indices, grad.to(cn.dtype), cn.shape[0])
        grad_x = grad_c = None
        with torch.autocast(cn.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                grad_x = (sparse @ cn).to(xn.dtype)
            if ctx.needs_input_grad[1]:
                grad_cn = sparse.t() @ xn.to(cn.dtype)  # d cos / d (C/|C|)
                radial = torch.bmm(grad_cn.unsqueeze(1), cn.unsqueeze(2)).view(-1, 1)
                grad_c = grad_cn.addcmul_(cn, radial, value=-1).div_(norms)
        return grad_x, grad_c, None, None, None, None


def sparse_decode(values: Tensor, indices: Tensor, weight: Tensor,
                  bias: Tensor | None = None) -> Tensor:
    """sum_j values[:, j] * weight[:, indices[:, j]] (+ bias); ``weight`` is a Linear(h, d)'s.

    ``indices`` must be sorted along the last dim (``encode`` returns them so).
    """
    shape = values.shape[:-1]
    out = _SparseDecode.apply(values.reshape(-1, values.shape[-1]),
                              indices.reshape(-1, indices.shape[-1]), weight)
    out = out.view(*shape, weight.shape[0])
    return out if bias is None else out + bias


def distance_activation(cos: Tensor) -> Tensor:
    """a = 2 - ||x/|x| - c/|c||| = 2 - sqrt(2 - 2 cos)."""
    return 2 - torch.sqrt(torch.clamp(2 - 2 * cos, min=DISTANCE_EPS))


@dataclass
class Encoded:
    """Top-k code of a batch: ``values``/``indices`` [n, k], index-sorted; ``cos`` [n, h]
    (no grad) is kept so that AuxK can pick its dead concepts without another matmul."""

    indices: Tensor
    cos: Tensor
    xn: Tensor
    concepts: Tensor
    cn: Tensor
    norms: Tensor
    values: Tensor = field(init=False)

    def select(self, indices: Tensor) -> Tensor:
        """Differentiable activations of other (sorted) concept indices [n, m]."""
        cos = _GatheredCosine.apply(self.xn, self.concepts, self.cn, self.norms, indices,
                                    self.cos.gather(1, indices))
        return distance_activation(cos)


def encode(x: Tensor, concepts: Tensor, k: int) -> Encoded:
    """Top-k of the distance encoder (= top-k cosine) over x [n, d] and concepts C [h, d]."""
    xn = F.normalize(x, dim=-1)
    with torch.no_grad():
        norms = concepts.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)  # as F.normalize
        cn = concepts / norms
        cos = xn @ cn.T
        cos = cos.to(torch.promote_types(cos.dtype, cn.dtype))  # bf16 under autocast
        indices = cos.topk(k, dim=-1).indices.sort(dim=-1).values
    code = Encoded(indices, cos, xn, concepts, cn, norms)
    code.values = code.select(indices)
    return code


def reconstruct(sae: VLSAE, x: Tensor, modality: str) -> Tensor:
    """``sae(x, modality)`` through the sparse kernels (no [n, k, d] gather)."""
    code = encode(x, sae.concepts, sae.k)
    decoder = sae.decoder(modality)
    return sparse_decode(code.values, code.indices, decoder.weight, decoder.bias)

"""A GPT-2-style causal decoder with an explicit key/value cache (PyTorch).

The architecture is GPT-2's (``transformers.GPT2Config``: learned
positions, pre-norm blocks, tanh-GELU MLP, LM head tied to the token
embedding) written out here rather than taken from ``GPT2LMHeadModel``,
because the cache is the export's contract: past keys and values go in and
come out as plain ``[batch, heads, past, head_dim]`` tensors, one pair per
layer, with no cache object in between.  That traces to ONNX with dynamic
batch / sequence / past axes on every ``transformers`` release, and the
ONNX Runtime loop can keep those tensors on the device between steps.

Padding may sit anywhere before a row's last token (the generator pads
between the conditioning prefix and the prompt): ``attention_mask`` hides
pad keys and ``position_ids`` (the running count of real tokens) skip them,
so a padded row computes exactly what it would alone.

Exported, each layer's attention (scores, causal and padding masks,
softmax, the weighted sum and the cache's concatenation) becomes one ONNX
Runtime ``com.microsoft::MultiHeadAttention`` node instead of about thirty
small ones (see :class:`_FusedAttention`): a decoding step is a few small
MatMuls per layer, and dispatching the unfused attention cost more than
the MatMuls themselves.  Eager PyTorch (training, the parity reference)
runs the plain computation in :func:`attend`, which is also what the
fused node is checked against.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from pipeline.tooling.model.config import GenerativeHeadConfig

#: added to the scores of keys a query may not see; finite so that fp16
#: graphs stay finite too (exp(-1e4) is 0 in every precision)
MASKED = -1.0e4

Cache = list[tuple[Tensor, Tensor]]


def gpt2_config(cfg: GenerativeHeadConfig):
    """The ``transformers`` config this decoder's architecture follows."""
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=cfg.vocab_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head,
        n_positions=cfg.n_positions, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=0.0,
        bos_token_id=cfg.bos_id, eos_token_id=cfg.eos_id, pad_token_id=cfg.pad_id,
        activation_function="gelu_new", tie_word_embeddings=True,
    )


class _Attention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, key_mask: Tensor, past: tuple[Tensor, Tensor] | None
                ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        q, k, v = self.c_attn(x).split(x.shape[-1], dim=2)
        if torch.onnx.is_in_onnx_export():
            pk, pv = past if past is not None else (None, None)
            out, pk, pv = _FusedAttention.apply(q, k, v, key_mask, pk, pv, self.n_head)
            present = (pk, pv)
        else:
            out, present = attend(q, k, v, key_mask, past, self.n_head)
        return self.resid_dropout(self.c_proj(out)), present


def attend(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor, past: tuple[Tensor, Tensor] | None, n_head: int
           ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """Causal multi-head attention of new positions ``q, k, v`` [B, T, E]
    over the cache ``past`` ([B, heads, P, head_dim] each) and themselves;
    ``key_mask`` [B, P + T] hides pad keys.  Returns the attended values
    [B, T, E] and the cache including the new positions."""
    b, t, e = q.shape
    head_dim = e // n_head

    def heads(x: Tensor) -> Tensor:
        return x.view(b, t, n_head, head_dim).transpose(1, 2)

    q, k, v = heads(q), heads(k), heads(v)
    if past is not None:
        k = torch.cat([past[0], k], dim=2)
        v = torch.cat([past[1], v], dim=2)
    s = k.shape[2]
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(head_dim)
    q_pos = torch.arange(t, device=q.device).unsqueeze(1) + (s - t)
    causal = torch.arange(s, device=q.device).unsqueeze(0) <= q_pos  # [t, s]
    allowed = causal.unsqueeze(0).unsqueeze(0) & key_mask.unsqueeze(1).unsqueeze(1)
    scores = scores.masked_fill(~allowed, MASKED)
    out = torch.matmul(torch.softmax(scores, dim=-1), v)
    return out.transpose(1, 2).reshape(b, t, e), (k, v)


class _FusedAttention(torch.autograd.Function):
    """:func:`attend` as one ``com.microsoft::MultiHeadAttention`` node in
    the exported graph (CPU and CUDA providers; TensorRT hands the node to
    CUDA).  The node computes the same function: ``unidirectional`` is the
    causal mask counted from the end of the cache (query ``i`` of ``T`` sees
    keys up to ``P + i``), the 2-D ``key_padding_mask`` hides pad keys with
    ``mask_filter_value`` (the same -1e4 as :data:`MASKED`), and the
    present key/value outputs are the past with the new positions appended.
    Tracing runs :func:`attend` for the output shapes; only export uses it."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor, past_k: Tensor | None,  # type: ignore[override]
                past_v: Tensor | None, n_head: int) -> tuple[Tensor, Tensor, Tensor]:
        out, (pk, pv) = attend(q, k, v, key_mask, None if past_k is None else (past_k, past_v), n_head)
        return out, pk, pv

    @staticmethod
    def symbolic(g, q, k, v, key_mask, past_k, past_v, n_head: int):  # type: ignore[no-untyped-def]
        def missing():  # an absent optional input
            node = g.op("prim::Constant")
            node.setType(torch._C.OptionalType.ofTensor())
            return node

        mask = g.op("Cast", key_mask, to_i=6)  # int32, as the node wants its key_padding_mask
        inputs = [q, k, v, missing(), mask, missing()]
        if past_k is not None:
            inputs += [past_k, past_v]
        out, pk, pv = g.op("com.microsoft::MultiHeadAttention", *inputs, num_heads_i=n_head, unidirectional_i=1,
                           mask_filter_value_f=MASKED, outputs=3)
        out.setType(q.type())
        return out, pk, pv


class _Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float, eps: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, eps=eps)
        self.attn = _Attention(n_embd, n_head, dropout)
        self.ln_2 = nn.LayerNorm(n_embd, eps=eps)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(approximate="tanh"),
                                 nn.Linear(4 * n_embd, n_embd), nn.Dropout(dropout))

    def forward(self, x: Tensor, key_mask: Tensor, past: tuple[Tensor, Tensor] | None
                ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        a, present = self.attn(self.ln_1(x), key_mask, past)
        x = x + a
        return x + self.mlp(self.ln_2(x)), present


class CausalDecoder(nn.Module):
    """Token + prefix embeddings in, next-token logits and the cache out."""

    def __init__(self, cfg: GenerativeHeadConfig) -> None:
        super().__init__()
        hf = gpt2_config(cfg)
        self.cfg = cfg
        self.wte = nn.Embedding(hf.vocab_size, hf.n_embd)
        self.wpe = nn.Embedding(hf.n_positions, hf.n_embd)
        self.drop = nn.Dropout(hf.embd_pdrop)
        self.h = nn.ModuleList(
            _Block(hf.n_embd, hf.n_head, hf.resid_pdrop, hf.layer_norm_epsilon) for _ in range(hf.n_layer))
        self.ln_f = nn.LayerNorm(hf.n_embd, eps=hf.layer_norm_epsilon)
        for m in self.modules():  # GPT-2's initialisation
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=hf.initializer_range)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def embed(self, input_ids: Tensor) -> Tensor:
        return self.wte(input_ids)

    def forward(self, embeds: Tensor, attention_mask: Tensor, position_ids: Tensor, past: Cache | None = None
                ) -> tuple[Tensor, Cache]:
        """``embeds`` [B, T, E] for the new positions; ``attention_mask``
        [B, past + T] over every key (1 = real); ``position_ids`` [B, T].
        Returns logits [B, T, vocab] and the cache including the new positions."""
        x = self.drop(embeds + self.wpe(position_ids))
        key_mask = attention_mask > 0
        presents: Cache = []
        for i, block in enumerate(self.h):
            x, kv = block(x, key_mask, None if past is None else past[i])
            presents.append(kv)
        logits = torch.matmul(self.ln_f(x), self.wte.weight.t())
        return logits, presents


def positions(attention_mask: Tensor) -> Tensor:
    """Position of each key: the count of real tokens before it (pads take
    their neighbour's, and are never attended to)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

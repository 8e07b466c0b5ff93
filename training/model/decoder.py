"""The PARSeq-style two-stream transformer decoder of CLIP4STR.

Pre-LayerNorm. The query stream holds the learnable position queries, the content stream
``[emb(BOS), p[:L-1] + emb(tokens)]``. Queries attend to the content under a mask, then
to the memory, then pass an MLP. The same :class:`CharDecoder` serves the visual branch
(memory ``F_i``) and the cross-modal branch (memory ``concat(F_i, F_t)``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from training.config import DecoderConfig


class TwoStreamLayer(nn.Module):
    """One decoder layer: masked self-attention to the content, cross-attention, MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.self_attn = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, width)
        )
        self.norm_query = nn.LayerNorm(width)
        self.norm_content = nn.LayerNorm(width)
        self.norm_cross = nn.LayerNorm(width)
        self.norm_mlp = nn.LayerNorm(width)
        self.drop_self = nn.Dropout(dropout)
        self.drop_cross = nn.Dropout(dropout)
        self.drop_mlp = nn.Dropout(dropout)

    def _stream(
        self,
        x: Tensor,
        x_norm: Tensor,
        content_norm: Tensor,
        memory_kv: tuple[Tensor, Tensor],
        mask: Tensor | None,
        padding_mask: Tensor | None,
    ) -> Tensor:
        attended = self.self_attn(
            x_norm, content_norm, content_norm, attn_mask=mask, key_padding_mask=padding_mask,
            need_weights=False,
        )[0]
        x = x + self.drop_self(attended)
        # the memory's keys and values come projected (once per decode, not once per step);
        # _attend splits heads without naming the memory length, so a traced graph keeps
        # it dynamic (aspect-keeping towers give a memory as long as the image is wide)
        crossed = _attend(self.cross_attn, self.norm_cross(x), None, None, memory_kv)
        x = x + self.drop_cross(crossed)
        return x + self.drop_mlp(self.mlp(self.norm_mlp(x)))

    def forward(
        self,
        query: Tensor,
        content: Tensor,
        memory: Tensor | tuple[Tensor, Tensor],
        query_mask: Tensor | None,
        content_mask: Tensor | None,
        padding_mask: Tensor | None,
        update_content: bool,
    ) -> tuple[Tensor, Tensor]:
        """``memory``: the memory tokens, or their keys and values (:func:`project_kv`)."""
        memory_kv = memory if isinstance(memory, tuple) else project_kv(self.cross_attn, memory)
        content_norm = self.norm_content(content)
        query = self._stream(query, self.norm_query(query), content_norm, memory_kv, query_mask, padding_mask)
        if update_content:
            content = self._stream(content, content_norm, content_norm, memory_kv, content_mask, padding_mask)
        return query, content


class CharDecoder(nn.Module):
    """Token embedding, position queries, the two-stream layers and the classifier head."""

    def __init__(self, width: int, num_tokens: int, num_classes: int, num_steps: int, cfg: DecoderConfig) -> None:
        super().__init__()
        self.width = width
        self.layers = nn.ModuleList(
            TwoStreamLayer(width, cfg.heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(width)
        self.embedding = nn.Embedding(num_tokens, width)
        self.pos_queries = nn.Parameter(torch.zeros(1, num_steps, width))
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(width, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.trunc_normal_(module.weight, std=0.02)
        nn.init.trunc_normal_(self.pos_queries, std=0.02)

    def embed(self, tokens: Tensor) -> Tensor:
        """Token embedding scaled by sqrt(width)."""
        return self.embedding(tokens) * math.sqrt(self.width)

    def forward(
        self,
        tokens: Tensor,
        memory: Tensor,
        query: Tensor | None = None,
        query_mask: Tensor | None = None,
        content_mask: Tensor | None = None,
        padding_mask: Tensor | None = None,
        memory_kv: list[tuple[Tensor, Tensor]] | None = None,
    ) -> Tensor:
        """Logits for each query. ``tokens`` is ``[BOS, t1, ...]`` of length L; queries
        default to the first L position queries. ``memory_kv`` (:meth:`memory_kv`) saves
        projecting the same memory again at every decode step."""
        batch, length = tokens.shape
        content = torch.cat(
            [self.embed(tokens[:, :1]), self.pos_queries[:, : length - 1] + self.embed(tokens[:, 1:])], dim=1
        )
        content = self.dropout(content)
        if query is None:
            query = self.pos_queries[:, :length].expand(batch, -1, -1)
        query = self.dropout(query)
        memory_kv = memory_kv if memory_kv is not None else self.memory_kv(memory)
        last = len(self.layers) - 1
        for i, (layer, kv) in enumerate(zip(self.layers, memory_kv, strict=True)):
            query, content = layer(query, content, kv, query_mask, content_mask, padding_mask, i != last)
        return self.head(self.norm(query))

    def memory_kv(self, memory: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Each layer's cross-attention keys and values of ``memory``."""
        return [project_kv(layer.cross_attn, memory) for layer in self.layers]


def causal_mask(size: int, device: torch.device | None = None) -> Tensor:
    """Float mask: position i sees 0..i (``-inf`` above the diagonal)."""
    return torch.triu(torch.full((size, size), float("-inf"), device=device), 1)


def padding_bias(padded: Tensor) -> Tensor:
    """Boolean key padding (True = ignore) as an additive float mask, matching the
    float attention masks."""
    return torch.zeros(padded.shape, device=padded.device).masked_fill(padded, float("-inf"))


def cloze_mask(size: int, device: torch.device | None = None) -> Tensor:
    """Refinement mask: query i sees every content position but its own token (i + 1)."""
    mask = torch.zeros((size, size), device=device)
    index = torch.arange(size - 1, device=device)
    mask[index, index + 1] = float("-inf")
    return mask


def autoregressive(decoder: CharDecoder, memory: Tensor, bos_id: int, num_steps: int, early_exit: bool) -> Tensor:
    """Greedy left-to-right decoding, ``num_steps`` steps; logits ``(B, steps, C+1)``.

    ``early_exit`` stops once every row has produced EOS (eager inference); export passes
    False so the traced loop has a fixed step count and no data-dependent branch.
    """
    batch = memory.shape[0]
    mask = causal_mask(num_steps, memory.device)
    queries = decoder.pos_queries[:, :num_steps].expand(batch, -1, -1)
    # int32 token ids (not int64) and a 2-D argmax ([:, 0], keepdim): the traced graph then
    # has no 1-D ArgMax and no int64 data tensors, which TensorRT prefers
    tokens = torch.full((batch, 1), bos_id, dtype=torch.int32, device=memory.device)
    memory_kv = decoder.memory_kv(memory)
    logits = []
    for i in range(num_steps):
        step = decoder(tokens, memory, query=queries[:, i : i + 1], query_mask=mask[i : i + 1, : i + 1],
                       memory_kv=memory_kv)
        logits.append(step)
        if i + 1 < num_steps:
            next_token = step[:, 0].argmax(-1, keepdim=True).int()
            tokens = torch.cat([tokens, next_token], dim=1)
            if early_exit and bool((tokens == 0).any(-1).all()):
                break
    out = torch.cat(logits, dim=1)
    if out.shape[1] < num_steps:  # pad early-exited rows with EOS so shapes are fixed
        pad = torch.zeros(batch, num_steps - out.shape[1], out.shape[2], dtype=out.dtype, device=out.device)
        pad[..., 0] = 1e4
        out = torch.cat([out, pad], dim=1)
    return out


def parallel(decoder: CharDecoder, memory: Tensor, bos_id: int, num_steps: int) -> Tensor:
    """PARSeq's non-autoregressive prediction: all ``num_steps`` position queries at once,
    each seeing only BOS (the context every permutation's first position is trained with);
    logits ``(B, steps, C+1)``. One decoder pass instead of ``num_steps``."""
    batch = memory.shape[0]
    tokens = torch.full((batch, 1), bos_id, dtype=torch.int32, device=memory.device)
    queries = decoder.pos_queries[:, :num_steps].expand(batch, -1, -1)
    return decoder(tokens, memory, query=queries)


def predict(decoder: CharDecoder, memory: Tensor, bos_id: int, num_steps: int, autoregressive_: bool,
            early_exit: bool) -> Tensor:
    """A branch's first prediction: :func:`autoregressive` or :func:`parallel`."""
    if autoregressive_:
        return autoregressive(decoder, memory, bos_id, num_steps, early_exit)
    return parallel(decoder, memory, bos_id, num_steps)


def refine(decoder: CharDecoder, memory: Tensor, logits: Tensor, bos_id: int, eos_id: int = 0) -> Tensor:
    """One cloze-mask pass with the previous prediction as context (tokens after the first
    EOS are padding-masked)."""
    batch, steps, _ = logits.shape
    bos = torch.full((batch, 1), bos_id, dtype=torch.int32, device=logits.device)
    tokens = torch.cat([bos, logits[:, :-1].argmax(-1).int()], dim=1)
    # compare with int32 tensors, not Python ints, and sum in int32: a traced graph then has
    # no int64 casts (the TorchScript exporter promotes a Python-int comparison to int64)
    is_eos = (tokens == tokens.new_full((), eos_id)).int()
    padding = padding_bias(is_eos.cumsum(-1, dtype=torch.int32) > is_eos.new_zeros(()))
    queries = decoder.pos_queries[:, :steps].expand(batch, -1, -1)
    return decoder(
        tokens, memory, query=queries, query_mask=cloze_mask(steps, logits.device),
        content_mask=causal_mask(steps, logits.device), padding_mask=padding,
    )


def _split_heads(x: Tensor, heads: int) -> Tensor:
    return x.unflatten(-1, (heads, -1)).transpose(-2, -3)


def project_kv(attn: nn.MultiheadAttention, key_value: Tensor) -> tuple[Tensor, Tensor]:
    """``attn``'s keys and values of ``key_value``, split into heads ``(..., H, S, D/H)``."""
    _, w_k, w_v = attn.in_proj_weight.chunk(3)
    _, b_k, b_v = attn.in_proj_bias.chunk(3)
    heads = attn.num_heads
    return _split_heads(F.linear(key_value, w_k, b_k), heads), _split_heads(F.linear(key_value, w_v, b_v), heads)


def _attend(attn: nn.MultiheadAttention, query: Tensor, key_value: Tensor | None, bias: Tensor | None,
            kv: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """``attn`` (its own weights) on inputs with any leading dims that broadcast, e.g. a
    permutation axis on the queries and none on a shared memory; ``kv`` are the keys and
    values of ``key_value`` already projected (:func:`project_kv`). Same maths as
    ``nn.MultiheadAttention`` with an additive float mask."""
    w_q = attn.in_proj_weight.chunk(3)[0]
    b_q = attn.in_proj_bias.chunk(3)[0]
    q = _split_heads(F.linear(query, w_q, b_q), attn.num_heads)
    k, v = kv if kv is not None else project_kv(attn, key_value)
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if bias is not None:
        scores = scores + bias
    weights = F.dropout(scores.softmax(-1), attn.dropout, attn.training)
    return attn.out_proj((weights @ v).transpose(-2, -3).flatten(-2))


def permutation_logits(decoder: CharDecoder, tokens: Tensor, memory: Tensor, query_masks: Tensor,
                       content_masks: Tensor, padding: Tensor | None) -> Tensor:
    """Logits ``(K, B, L, C+1)`` for K permutation masks in one pass (training).

    Equal to calling ``decoder(tokens, memory, query_mask=query_masks[k],
    content_mask=content_masks[k], padding_mask=padding)`` for each k, but the memory's and
    the shared content's keys and values are projected once instead of K times.
    """
    batch, length = tokens.shape
    content = torch.cat(
        [decoder.embed(tokens[:, :1]), decoder.pos_queries[:, : length - 1] + decoder.embed(tokens[:, 1:])], dim=1
    )
    content = decoder.dropout(content)
    query = decoder.dropout(decoder.pos_queries[:, :length]).unsqueeze(0)  # (1, 1, L, D)
    pad = padding[:, None, None, :] if padding is not None else 0.0  # (B, 1, 1, L) over keys
    query_bias = query_masks[:, None, None] + pad  # (K, B, 1, L, L)
    content_bias = content_masks[:, None, None] + pad
    last = len(decoder.layers) - 1
    for i, layer in enumerate(decoder.layers):
        content_norm = layer.norm_content(content)
        memory_kv = project_kv(layer.cross_attn, memory)

        def stream(x: Tensor, x_norm: Tensor, bias: Tensor, layer: TwoStreamLayer = layer,
                   content_norm: Tensor = content_norm, memory_kv: tuple[Tensor, Tensor] = memory_kv) -> Tensor:
            x = x + layer.drop_self(_attend(layer.self_attn, x_norm, content_norm, bias))
            x = x + layer.drop_cross(_attend(layer.cross_attn, layer.norm_cross(x), None, None, memory_kv))
            return x + layer.drop_mlp(layer.mlp(layer.norm_mlp(x)))

        new_query = stream(query, layer.norm_query(query), query_bias)
        if i != last:
            content = stream(content, content_norm, content_bias)
        query = new_query
    return decoder.head(decoder.norm(query))

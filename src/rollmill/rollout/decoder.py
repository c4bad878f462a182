"""A lean inference forward over a transformers Llama-family model, writing into a `SlotKV`.

It calls the model's own modules (projections, norms, MLP, rotary embedding), so it shares the
trainer's weights and needs no conversion; what it replaces is the per-step machinery around them
(cache objects, 4-D mask building, concatenating the past) that dominates decode time on small models.
One code path serves prefill (many tokens per row, each row continuing at its own position) and decode
(one token per row). Grouped-query attention folds the query heads of a K/V head into the query-length
axis, so K/V are never repeated.

The projections run fused (q|k|v and gate|up as one matmul each) on weights copied into oneDNN's
blocked layout when torch has oneDNN for the model's device: on this class of CPU that is 1.3-2.6x
the throughput of `F.linear` at decode batch sizes (the vocabulary projection gains most). Every
weight the forward uses (projections, norms, embedding) is a private copy of one weight version:
`refresh()` takes a new one, and the engine calls it on every update, so a trainer stepping the same
module in place never changes a rollout halfway. The copies may be in another dtype than the model
(bf16 for speed), which makes the sampled policy a rounded copy of the trained one.
"""

from __future__ import annotations

import copy
import functools

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from rollmill.rollout.kv import SlotKV

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def fast_path_problem(model) -> str | None:
    """Why `model` can't use the fast forward (None when it can)."""
    config = model.config
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        return f"model_type {config.model_type!r} is not one of {SUPPORTED_MODEL_TYPES}"
    layer_types = getattr(config, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types) or (
        config.model_type == "mistral" and getattr(config, "sliding_window", None)
    ):
        return "sliding-window attention is not supported by the fast forward"
    return None


class Linear:
    """y = x W^T + b on a private copy of W, in oneDNN's blocked layout when available."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, packed: bool, dtype: torch.dtype):
        self.out_features, self.in_features = weight.shape
        self.bias = None if bias is None else bias.detach().to(dtype, copy=True)
        self.packed = packed
        weight = weight.detach().to(dtype, copy=True)
        # 32: a decode-sized batch hint for the blocked layout
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, 32) if packed else weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def fused_linear(modules: list[torch.nn.Linear], packed: bool, dtype: torch.dtype) -> Linear:
    """One `Linear` computing the outputs of `modules` side by side, with weights in `dtype`."""
    weight = torch.cat([m.weight for m in modules])
    biases = [m.bias for m in modules]
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat([b if b is not None else torch.zeros(m.out_features, dtype=m.weight.dtype)
                          for b, m in zip(biases, modules)])
    return Linear(weight, bias, packed, dtype)


def can_pack(model, dtype: torch.dtype) -> bool:
    """oneDNN's packed linear is a CPU kernel for fp32 and (on CPUs with AVX-512 or AVX-NE-CONVERT) bf16;
    elsewhere `F.linear` is used."""
    device = model.model.embed_tokens.weight.device
    return device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and _onednn_packs(dtype)


@functools.cache
def _onednn_packs(dtype: torch.dtype) -> bool:
    """Whether this CPU's oneDNN packs weights of `dtype` (asked once: the answer is a CPU feature)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(8, 8, dtype=dtype), 32)
    except RuntimeError:
        return False
    return True


class Decoder:
    """Runs rows of a `SlotKV` forward by T tokens each and returns next-token logits."""

    def __init__(self, model, dtype: torch.dtype | None = None):
        problem = fast_path_problem(model)
        if problem:
            raise ValueError(f"Decoder: {problem}")
        self.model = model
        body = model.model
        self.layers, self.rotary = body.layers, body.rotary_emb  # the rotary embedding holds no weights
        attn = self.layers[0].self_attn
        config = model.config
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = attn.head_dim
        self.group = self.heads // self.kv_heads
        self.dtype = dtype or model.model.embed_tokens.weight.dtype
        self.packed = can_pack(model, self.dtype)
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        """Take a private copy of the model's current weights (fused, packed projections; norms; embedding)."""
        frozen = lambda module: copy.deepcopy(module).requires_grad_(False).to(self.dtype)  # noqa: E731
        self.embed, self.norm = frozen(self.model.model.embed_tokens), frozen(self.model.model.norm)
        self.input_norms = [frozen(layer.input_layernorm) for layer in self.layers]
        self.post_norms = [frozen(layer.post_attention_layernorm) for layer in self.layers]
        attn = [layer.self_attn for layer in self.layers]
        self.qk_norms = [(frozen(a.q_norm), frozen(a.k_norm)) if hasattr(a, "q_norm") else None for a in attn]
        self.qkv = [fused_linear([a.q_proj, a.k_proj, a.v_proj], self.packed, self.dtype) for a in attn]
        self.out = [fused_linear([a.o_proj], self.packed, self.dtype) for a in attn]
        mlps = [layer.mlp for layer in self.layers]
        self.gate_up = [fused_linear([m.gate_proj, m.up_proj], self.packed, self.dtype) for m in mlps]
        self.down = [fused_linear([m.down_proj], self.packed, self.dtype) for m in mlps]
        self.lm_head = fused_linear([self.model.lm_head], self.packed, self.dtype)

    def new_cache(self, slots: int, capacity: int) -> SlotKV:
        return SlotKV(len(self.layers), slots, self.kv_heads, capacity, self.head_dim, self.dtype)

    @torch.no_grad()
    def forward(self, kv: SlotKV, rows: list[int], ids: torch.Tensor, starts: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """Feed `ids` [B, T] to cache rows `rows`, row b continuing at position `starts[b]`.

        Rows may be right-padded: only tokens up to index `last[b]` are real, and the logits
        [B, vocab] returned are those after that token. Padding tokens write their K/V into the
        cache's last position, which no real token uses and no mask exposes.
        """
        batch, width = ids.shape
        steps = torch.arange(width)
        real = steps[None, :] <= last[:, None]
        positions = torch.where(real, starts[:, None] + steps, kv.capacity - 1)
        seen = int((starts + last).max()) + 1
        if seen >= kv.capacity:
            raise ValueError(f"Decoder.forward: position {seen - 1} needs a cache longer than {kv.capacity - 1}")
        kv.clean_to(seen)
        contiguous = rows == list(range(rows[0], rows[0] + batch))
        sel = slice(rows[0], rows[0] + batch) if contiguous else torch.tensor(rows)
        row_index = torch.tensor(rows)[:, None].expand(batch, width)
        # query (g, t) of row b may see key j when j <= positions[b, t]; shape [B, 1, G*T, seen]
        mask = torch.arange(seen)[None, None, :] <= positions[:, :, None]
        mask = mask[:, None, None].expand(batch, 1, self.group, width, seen).reshape(batch, 1, self.group * width, seen)
        hidden = self.embed(ids)
        cos, sin = self.rotary(hidden, positions)
        q_width, kv_width = self.heads * self.head_dim, self.kv_heads * self.head_dim
        for index, layer in enumerate(self.layers):
            q, k, v = self.qkv[index](self.input_norms[index](hidden)).split([q_width, kv_width, kv_width], dim=-1)
            q = q.view(batch, width, self.heads, self.head_dim)
            k = k.view(batch, width, self.kv_heads, self.head_dim)
            v = v.view(batch, width, self.kv_heads, self.head_dim)
            if self.qk_norms[index] is not None:  # qwen3 normalizes q and k per head
                q, k = self.qk_norms[index][0](q), self.qk_norms[index][1](k)
            q, k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
            kv.k[index][row_index, :, positions] = k.transpose(1, 2)
            kv.v[index][row_index, :, positions] = v
            q = q.reshape(batch, self.kv_heads, self.group * width, self.head_dim)
            out = F.scaled_dot_product_attention(
                q, kv.k[index, sel, :, :seen], kv.v[index, sel, :, :seen], attn_mask=mask
            )
            out = out.view(batch, self.kv_heads, self.group, width, self.head_dim).permute(0, 3, 1, 2, 4)
            hidden = hidden + self.out[index](out.reshape(batch, width, q_width))
            gate, up = self.gate_up[index](self.post_norms[index](hidden)).chunk(2, dim=-1)
            hidden = hidden + self.down[index](layer.mlp.act_fn(gate) * up)
        final = self.norm(hidden[torch.arange(batch), last])
        return self.lm_head(final)

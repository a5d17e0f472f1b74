"""The ``hf`` backend's model step: Llama-family weights and one batched, ragged forward pass.

transformers loads the model; we take its modules' weights and run our own forward pass, because
``model.forward`` handles one padded rectangle per call while a continuous-batching step is *ragged*:
some sequences prefill a chunk of a prompt, most decode one token, each at its own position.

- every sequence's new tokens are flattened into one ``[N, hidden]`` batch, so each linear layer
  (fused q|k|v, o, fused gate|up, down) runs **once per layer per step**;
- decoding sequences (one new token) attend in **one SDPA call per slab per layer**: the query heads
  that share a KV head are folded into the query-length axis (GQA without copying K/V) and a length
  mask hides each slot's unused tail;
- prefill chunks attend one sequence at a time with a causal mask offset by the tokens already
  cached;
- the final norm and ``lm_head`` run only on the rows that sample, ``lm_head`` in row chunks (faster
  on CPU than one tall GEMM, bit-identical).

The arithmetic mirrors ``transformers``' Llama modules operation for operation (RMSNorm in float32,
rotate-half RoPE from the model's own rotary module, SDPA with the same scale), so greedy decoding
reproduces ``model.generate(do_sample=False)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .backend import SeqWork
from .hf_kv import Seq, Slab

#: Architectures whose decoder layer is exactly Llama's (pre-norm RMSNorm, RoPE, GQA, SwiGLU MLP).
SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2"})
#: Rows of ``lm_head`` per GEMM (tall-skinny GEMMs are slower on CPU than a few medium ones).
LM_HEAD_CHUNK_ROWS = 2048


@dataclass(slots=True)
class Weights:
    embed: torch.Tensor
    final_norm: torch.Tensor
    lm_head_chunks: list[torch.Tensor]
    input_norm: list[torch.Tensor]
    post_norm: list[torch.Tensor]
    qkv: list[torch.Tensor]
    qkv_bias: list[torch.Tensor | None]
    o: list[torch.Tensor]
    o_bias: list[torch.Tensor | None]
    gate_up: list[torch.Tensor]
    down: list[torch.Tensor]
    cos: torch.Tensor  # [max_context, head_dim]
    sin_signed: torch.Tensor  # sin with the first half negated (see the RoPE step)


@dataclass(slots=True)
class DecodeGroup:
    slab: Slab
    row_start: int
    rows: int
    slots: torch.Tensor  # [B] slot per row
    positions: torch.Tensor  # [B] write position per row
    span: int  # slots [0:span) take part in the SDPA call
    scatter: bool  # rows are not exactly slots 0..span-1 in order
    keys: int  # longest context in the group (SDPA key length)
    mask: torch.Tensor  # [span, 1, 1, keys] bool


@dataclass(slots=True)
class PrefillItem:
    slab: Slab
    slot: int
    row_start: int
    rows: int
    start: int
    mask: torch.Tensor | None  # [rows, start+rows] bool, None = plain causal (start == 0)


@dataclass(slots=True)
class Plan:
    token_ids: torch.Tensor
    positions: torch.Tensor
    decode: list[DecodeGroup] = field(default_factory=list)
    prefill: list[PrefillItem] = field(default_factory=list)
    sample_rows: list[int] = field(default_factory=list)
    sample_work: list[SeqWork] = field(default_factory=list)


class LlamaStep:
    """The model's shape, its weights (taken from a transformers model) and the batched forward pass."""

    def __init__(self, model: Any, model_name: str, device: torch.device, dtype: torch.dtype) -> None:
        config = model.config
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"the hf backend runs Llama-family models ({', '.join(sorted(SUPPORTED_MODEL_TYPES))}); "
                f"{model_name!r} is {config.model_type!r}"
            )
        if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
            if config.model_type == "mistral":
                raise ValueError(f"{model_name!r} uses sliding-window attention, which the hf backend lacks")
        self.device, self.dtype = device, dtype
        self.max_context = int(config.max_position_embeddings)
        self.num_layers = int(config.num_hidden_layers)
        self.num_heads = int(config.num_attention_heads)
        self.num_kv_heads = int(getattr(config, "num_key_value_heads", None) or self.num_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.num_heads)
        self.group = self.num_heads // self.num_kv_heads
        self.hidden_size = int(config.hidden_size)
        self.intermediate_size = int(config.intermediate_size)
        self.rms_eps = float(config.rms_norm_eps)
        self.w = self._collect_weights(model.to(device))

    def _collect_weights(self, model: Any) -> Weights:
        inner = model.model
        with torch.inference_mode():
            layers = inner.layers
            qkv, qkv_bias, o, o_bias, gate_up, down, in_norm, post_norm = [], [], [], [], [], [], [], []
            for layer in layers:
                attn, mlp = layer.self_attn, layer.mlp
                qkv.append(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).contiguous())
                if attn.q_proj.bias is not None:
                    qkv_bias.append(torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]))
                else:
                    qkv_bias.append(None)
                o.append(attn.o_proj.weight.detach())
                o_bias.append(attn.o_proj.bias.detach() if attn.o_proj.bias is not None else None)
                if mlp.gate_proj.bias is not None or mlp.up_proj.bias is not None or mlp.down_proj.bias is not None:
                    raise ValueError("MLP biases are not supported by the hf backend")
                gate_up.append(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).contiguous())
                down.append(mlp.down_proj.weight.detach())
                in_norm.append(layer.input_layernorm.weight.detach())
                post_norm.append(layer.post_attention_layernorm.weight.detach())
                act = getattr(mlp.act_fn, "__class__", type(None)).__name__.lower()
                if "silu" not in act and "swish" not in act:
                    raise ValueError(f"MLP activation {act!r} is not supported by the hf backend")
            lm_head = model.lm_head.weight.detach()
            # cos/sin for every position, computed by the model's own rotary module (same numbers)
            positions = torch.arange(self.max_context, device=self.device)[None, :]
            probe = torch.empty(1, dtype=self.dtype, device=self.device)
            cos, sin = inner.rotary_emb(probe, positions)
            return Weights(
                embed=inner.embed_tokens.weight.detach(),
                final_norm=inner.norm.weight.detach(),
                lm_head_chunks=list(lm_head.split(LM_HEAD_CHUNK_ROWS)),
                input_norm=in_norm,
                post_norm=post_norm,
                qkv=qkv,
                qkv_bias=qkv_bias,
                o=o,
                o_bias=o_bias,
                gate_up=gate_up,
                down=down,
                cos=cos[0].contiguous(),
                sin_signed=torch.cat((-sin[0, :, : self.head_dim // 2], sin[0, :, self.head_dim // 2 :]), -1),
            )

    def plan(self, work: list[SeqWork], seqs: dict[str, Seq]) -> Plan:
        """Row layout of one step; every sequence is already placed in a slot that holds its tokens."""

        decode = [w for w in work if len(w.token_ids) == 1]
        prefill = [w for w in work if len(w.token_ids) > 1]
        decode.sort(key=lambda w: (seqs[w.seq_id].slab.capacity, seqs[w.seq_id].slot))  # type: ignore[union-attr]
        ordered = decode + prefill
        token_ids: list[int] = []
        positions: list[int] = []
        for w in ordered:
            token_ids.extend(w.token_ids)
            positions.extend(range(w.start_pos, w.start_pos + len(w.token_ids)))
        dev = self.device
        plan = Plan(
            token_ids=torch.tensor(token_ids, dtype=torch.long, device=dev),
            positions=torch.tensor(positions, dtype=torch.long, device=dev),
        )

        row = 0
        i = 0
        while i < len(decode):
            slab = seqs[decode[i].seq_id].slab
            j = i
            while j < len(decode) and seqs[decode[j].seq_id].slab is slab:
                j += 1
            group = decode[i:j]
            slots = [seqs[w.seq_id].slot for w in group]
            lengths = [w.start_pos + 1 for w in group]
            span = slots[-1] + 1
            scatter = span != len(group)
            keys = max(lengths)
            if scatter:
                span_lengths = [1] * span
                for s, n in zip(slots, lengths, strict=True):
                    span_lengths[s] = n
            else:
                span_lengths = lengths
            lens_t = torch.tensor(span_lengths, device=dev)
            mask = (torch.arange(keys, device=dev)[None, :] < lens_t[:, None])[:, None, None, :]
            assert slab is not None
            plan.decode.append(
                DecodeGroup(
                    slab=slab,
                    row_start=row,
                    rows=len(group),
                    slots=torch.tensor(slots, dtype=torch.long, device=dev),
                    positions=torch.tensor([w.start_pos for w in group], dtype=torch.long, device=dev),
                    span=span,
                    scatter=scatter,
                    keys=keys,
                    mask=mask,
                )
            )
            row += len(group)
            i = j
        for w in prefill:
            seq = seqs[w.seq_id]
            t = len(w.token_ids)
            mask = None
            if w.start_pos > 0:
                q_pos = torch.arange(w.start_pos, w.start_pos + t, device=dev)
                mask = torch.arange(w.start_pos + t, device=dev)[None, :] <= q_pos[:, None]
            assert seq.slab is not None
            plan.prefill.append(PrefillItem(seq.slab, seq.slot, row, t, w.start_pos, mask))
            row += t

        row = 0
        for w in ordered:
            row += len(w.token_ids)
            if w.sample:
                plan.sample_rows.append(row - 1)
                plan.sample_work.append(w)
        return plan

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            # one fused kernel; bit-identical to transformers' LlamaRMSNorm in float32
            return F.rms_norm(x, (x.shape[-1],), weight, self.rms_eps)
        h = x.to(torch.float32)  # transformers' LlamaRMSNorm, verbatim
        variance = h.pow(2).mean(-1, keepdim=True)
        h = h * torch.rsqrt(variance + self.rms_eps)
        return weight * h.to(x.dtype)

    def forward(self, plan: Plan) -> torch.Tensor | None:
        w = self.w
        n = plan.token_ids.numel()
        hq, hkv, hd, grp = self.num_heads, self.num_kv_heads, self.head_dim, self.group
        q_width = hq * hd
        qk_heads = hq + hkv
        half = hd // 2
        cos = w.cos[plan.positions][:, None, :]
        sin = w.sin_signed[plan.positions][:, None, :]
        h = w.embed[plan.token_ids]
        for li in range(self.num_layers):
            x = self.rms_norm(h, w.input_norm[li])
            qkv = F.linear(x, w.qkv[li], w.qkv_bias[li])
            # RoPE on q and k together, written back into qkv: x*cos + rotate_half(x)*sin, where
            # rotate_half(x) * sin == roll(x, half) * [-sin1, sin2] bit for bit
            qk = qkv[:, : qk_heads * hd].view(n, qk_heads, hd)
            torch.add(qk * cos, qk.roll(half, dims=-1) * sin, out=qk)
            q = qk[:, :hq]
            new_kv = qkv[:, q_width:].view(n, 2, hkv, hd)  # roped K, then V
            kv = None
            outs: list[torch.Tensor] = []
            for g in plan.decode:
                kv = g.slab.kv[li]  # [2, slots, kv_heads, capacity, head_dim]
                a, b = g.row_start, g.row_start + g.rows
                kv[:, g.slots, :, g.positions] = new_kv[a:b]
                qg = q[a:b].reshape(g.rows, hkv, grp, hd)  # query heads sharing a KV head -> query rows
                if g.scatter:
                    qfull = qg.new_zeros((g.span, hkv, grp, hd))
                    qfull[g.slots] = qg
                    qg = qfull
                o = F.scaled_dot_product_attention(
                    qg, kv[0, : g.span, :, : g.keys], kv[1, : g.span, :, : g.keys], attn_mask=g.mask
                )
                if g.scatter:
                    o = o[g.slots]
                outs.append(o.reshape(g.rows, q_width))
            for p in plan.prefill:
                kv = p.slab.kv[li]
                a, b = p.row_start, p.row_start + p.rows
                end = p.start + p.rows
                kv[:, p.slot, :, p.start : end] = new_kv[a:b].permute(1, 2, 0, 3)
                o = F.scaled_dot_product_attention(
                    q[a:b].transpose(0, 1)[None],
                    kv[0, p.slot : p.slot + 1, :, :end],
                    kv[1, p.slot : p.slot + 1, :, :end],
                    attn_mask=p.mask,
                    is_causal=p.mask is None,
                    enable_gqa=True,
                )
                outs.append(o[0].transpose(0, 1).reshape(p.rows, q_width))
            attn = outs[0] if len(outs) == 1 else torch.cat(outs)
            h = h + F.linear(attn, w.o[li], w.o_bias[li])
            x = self.rms_norm(h, w.post_norm[li])
            gate_up = F.linear(x, w.gate_up[li])
            gate, up = gate_up.split(self.intermediate_size, dim=-1)
            h = h + F.linear(F.silu(gate, inplace=True) * up, w.down[li])
        if not plan.sample_rows:
            return None
        rows = torch.tensor(plan.sample_rows, dtype=torch.long, device=self.device)
        x = self.rms_norm(h[rows], w.final_norm)
        logits = torch.empty((x.shape[0], sum(c.shape[0] for c in w.lm_head_chunks)), dtype=x.dtype, device=self.device)
        col = 0
        for chunk in w.lm_head_chunks:
            torch.mm(x, chunk.t(), out=logits[:, col : col + chunk.shape[0]])
            col += chunk.shape[0]
        return logits

"""A GPT language model in plain PyTorch, in the spirit of nanoGPT.

Parameter names match nanoGPT's, so its checkpoints load with ``load_state_dict`` (after
``strip_compile_prefix`` if the checkpoint was saved from a ``torch.compile``-d model).

Shape letters: B batch, T sequence length, C n_embd, nh n_head, hs head size (C // nh),
V vocab size.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class GPTConfig:
    block_size: int  # longest context the model sees (number of learned positions)
    vocab_size: int
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float
    bias: bool  # bias in Linear and LayerNorm layers
    activation: str = "gelu"  # "gelu" (exact, nanoGPT) or "gelu_tanh" (GPT-2's approximation)

    def __post_init__(self) -> None:
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


class LayerKV:
    """One layer's keys and values for a batch, preallocated to block_size positions.

    The buffers are allocated on the first write so they take the dtype the attention really
    produces (bf16 under autocast, say).
    """

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.k: Tensor | None = None  # (B, nh, block_size, hs)
        self.v: Tensor | None = None

    def update(self, k: Tensor, v: Tensor, start_pos: int) -> tuple[Tensor, Tensor]:
        """Store k, v (B, nh, T, hs) at positions start_pos.. and return all keys and values
        so far, (B, nh, start_pos + T, hs)."""
        if self.k is None or self.v is None:
            B, nh, _, hs = k.shape
            self.k = k.new_zeros(B, nh, self.block_size, hs)
            self.v = v.new_zeros(B, nh, self.block_size, hs)
        end = start_pos + k.size(2)
        self.k[:, :, start_pos:end] = k
        self.v[:, :, start_pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """Keys and values of every layer, so generation computes only the new tokens."""

    def __init__(self, n_layer: int, block_size: int) -> None:
        self.layers = [LayerKV(block_size) for _ in range(n_layer)]

    def select(self, rows: Tensor) -> KVCache:
        """A cache whose row i is row `rows[i]` of this one: one context continued several
        ways (the keys and values are copied)."""
        picked = KVCache(0, 0)
        for layer in self.layers:
            new = LayerKV(layer.block_size)
            if layer.k is not None and layer.v is not None:
                new.k, new.v = layer.k.index_select(0, rows), layer.v.index_select(0, rows)
            picked.layers.append(new)
        return picked


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout  # on the attention weights, applied inside SDPA
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, kv: LayerKV | None = None, start_pos: int = 0) -> Tensor:
        """x (B, T, C) holds positions start_pos..start_pos+T-1; without kv, start_pos is 0."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        # (B, T, C) -> (B, nh, T, hs)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if kv is not None:
            k, v = kv.update(k, v, start_pos)  # (B, nh, start_pos + T, hs)

        # From position 0 the plain causal mask is right. A single later token may see every
        # cached key, so needs no mask. Several later tokens need the causal mask shifted right
        # by start_pos (SDPA's is_causal aligns it top-left, which would be wrong here).
        mask = None
        if start_pos > 0 and T > 1:
            mask = torch.ones(T, start_pos + T, dtype=torch.bool, device=x.device)
            mask = mask.tril(diagonal=start_pos)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=start_pos == 0,
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, nh, T, hs) -> (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh" if config.activation == "gelu_tanh" else "none")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, kv: LayerKV | None = None, start_pos: int = 0) -> Tensor:
        x = x + self.attn(self.ln_1(x), kv, start_pos)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        # Typed Any: mypy cannot see a ModuleDict's entries as attributes (self.transformer.wte).
        self.transformer: Any = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying: the input embedding and the output projection share one matrix.
        self.transformer["wte"].weight = self.lm_head.weight

        self.apply(self._init_weights)
        # Each block adds two c_proj outputs to the residual stream; scale them down so its
        # variance does not grow with depth (GPT-2 paper).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def _hidden(self, idx: Tensor, cache: KVCache | None, start_pos: int) -> Tensor:
        """Final hidden states (B, T, C) for tokens idx (B, T) at positions start_pos.."""
        T = idx.size(1)
        if start_pos + T > self.config.block_size:
            raise ValueError(
                f"cannot run {T} tokens from position {start_pos}: the model's block_size is "
                f"{self.config.block_size}; crop the input to its last "
                f"{self.config.block_size - start_pos} tokens"
            )
        pos = torch.arange(start_pos, start_pos + T, dtype=torch.long, device=idx.device)
        tok_emb = self.transformer.wte(idx)  # (B, T, C)
        pos_emb = self.transformer.wpe(pos)  # (T, C), broadcast over the batch
        x = self.transformer.drop(tok_emb + pos_emb)
        for i, block in enumerate(self.transformer.h):
            x = block(x, None if cache is None else cache.layers[i], start_pos)
        return self.transformer.ln_f(x)

    def hidden_states(
        self, idx: Tensor, cache: KVCache | None = None, start_pos: int = 0
    ) -> Tensor:
        """The final hidden states (B, T, C) of tokens idx (B, T) at positions start_pos..,
        what lm_head turns into logits (evaluation needs the logits of a few positions only).
        With a cache, as forward_with_cache: earlier positions are in it, these are added."""
        return self._hidden(idx, cache, start_pos)

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Training (targets given): logits (B, T, V) and the mean cross-entropy, ignoring
        targets of -1. Inference (no targets): logits of the last position only, (B, 1, V)."""
        x = self._hidden(idx, None, 0)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None  # a list index keeps the T dim
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def forward_with_cache(
        self, idx: Tensor, cache: KVCache | None = None, start_pos: int = 0
    ) -> tuple[Tensor, KVCache]:
        """Run tokens idx (B, T) at positions start_pos..start_pos+T-1, whose earlier positions
        are already in cache; returns the last position's logits (B, V) and the updated cache.

        Start with cache=None and start_pos=0 (the prompt); then feed each new token with
        start_pos = number of tokens seen so far. start_pos + T may not exceed block_size.
        """
        if cache is None:
            cache = KVCache(self.config.n_layer, self.config.block_size)
        x = self._hidden(idx, cache, start_pos)
        return self.lm_head(x[:, -1, :]), cache

    def default_refresh_keep(self) -> int | None:
        """The `refresh_keep` that `sample` and the TensorBoard text sample use: past the
        context window, refill the KV cache from its last 3/4 (>= 3/4 of the context is kept)
        rather than recompute the whole window for every token. A one-token context has
        nothing to keep: None, nanoGPT's exact recompute."""
        block_size = self.config.block_size
        return max(1, block_size * 3 // 4) if block_size > 1 else None

    @torch.inference_mode()  # no autograd bookkeeping: about 20% faster per token on a CPU
    def generate(
        self,
        idx: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        refresh_keep: int | None = None,
        vocab_limit: int | None = None,
    ) -> Tensor:
        """Continue each row of idx (B, T0) by max_new_tokens tokens; returns (B, T0 + new).

        Past block_size tokens, refresh_keep=None recomputes the last block_size tokens for
        every new token, exactly as nanoGPT does. refresh_keep=k instead refills the cache
        from the last k tokens whenever it is full and then decodes from the cache again:
        the model always sees at least k tokens of context, at a fraction of the cost.
        vocab_limit=n only picks among the first n tokens (a vocabulary padded for speed).

        temperature 0 picks the most likely token (top_k and top_p are then ignored).
        Otherwise top_k keeps the k most likely tokens and top_p the smallest set whose
        probability reaches top_p, before sampling. Put the model in eval mode first.
        """
        if idx.dim() != 2 or idx.size(1) == 0:
            raise ValueError(f"idx must have shape (B, T) with T >= 1, got {tuple(idx.shape)}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")

        block_size = self.config.block_size
        if refresh_keep is not None and not 1 <= refresh_keep < block_size:
            raise ValueError(f"refresh_keep must be in [1, {block_size}), got {refresh_keep}")
        cache: KVCache | None = None
        filled = 0  # positions of the cache in use
        for _ in range(max_new_tokens):
            seen = idx.size(1)
            if refresh_keep is not None and (cache is None or filled >= block_size):
                window = idx[:, -min(seen, block_size if cache is None else refresh_keep) :]
                logits, cache = self.forward_with_cache(window)
                filled = window.size(1)
            elif refresh_keep is not None:
                logits, cache = self.forward_with_cache(idx[:, -1:], cache, start_pos=filled)
                filled += 1
            elif seen > block_size:
                # Past the context window the model sees the last block_size tokens at
                # positions 0..block_size-1 (as nanoGPT does). Every token's position has
                # shifted, so the cached keys are stale: run the window in full.
                logits = self(idx[:, -block_size:])[0][:, -1, :]
            elif cache is None:
                logits, cache = self.forward_with_cache(idx)
            else:
                logits, cache = self.forward_with_cache(idx[:, -1:], cache, start_pos=seen - 1)
            if vocab_limit is not None:
                logits = logits[:, :vocab_limit]
            idx_next = _next_token(logits, temperature, top_k, top_p, generator)  # (B, 1)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx

    def num_params(self, non_embedding: bool = True) -> int:
        """Number of parameters (the tied wte/lm_head matrix counted once). By default the
        position embeddings are left out; the token embeddings stay in, as lm_head."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self) -> int:
        """Estimated FLOPs to train on one token (forward and backward), as in the PaLM paper:

        6N for the matmuls with the N weights (2 forward, 4 backward per weight), plus
        12 * n_layer * n_head * head_size * block_size for attention's scores and weighted sum,
        which work on the whole context rather than on weights. N is num_params().
        """
        cfg = self.config
        head_size = cfg.n_embd // cfg.n_head
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_head * head_size * cfg.block_size

    def configure_param_groups(
        self, weight_decay: float, muon: bool = False
    ) -> list[dict[str, Any]]:
        """Optimizer groups, each parameter in exactly one, named by the optimizer that updates
        it: weight decay on matrices and embeddings (dim >= 2), none on biases and LayerNorm
        gains. With `muon`, the transformer blocks' 2-D weight matrices form a first group of
        their own, for Muon; the embeddings (the tied head among them) stay with AdamW."""
        params = [p for p in self.parameters() if p.requires_grad]
        blocks = [p for p in self.transformer.h.parameters() if p.requires_grad and p.dim() == 2]
        matrices = {id(p) for p in blocks} if muon else set()
        rest = [p for p in params if id(p) not in matrices]
        first = [{"params": blocks, "weight_decay": weight_decay, "optimizer": "muon"}]
        return (first if muon else []) + [
            {"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay,
             "optimizer": "adamw"},
            {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0,
             "optimizer": "adamw"},
        ]  # fmt: skip


def _next_token(
    logits: Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> Tensor:
    """Pick one token per row of logits (B, V); returns (B, 1)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float()
    # Shifted so the largest is 0 (softmax is unchanged): no temperature, however small,
    # overflows the others to inf and the probabilities to NaN.
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
    if top_k is not None:
        kth_best = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]  # (B, 1)
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    if top_p is not None:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Drop a token once the tokens ranked above it already reach top_p; this keeps the
        # smallest set reaching top_p, and never drops the top token (nothing ranks above it).
        drop_sorted = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)  # multinomial does not need them to sum to 1
    return torch.multinomial(probs, num_samples=1, generator=generator)


def strip_compile_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Remove the '_orig_mod.' prefix torch.compile adds to state-dict keys (nanoGPT saves its
    checkpoints from the compiled model)."""
    return {key.removeprefix("_orig_mod."): value for key, value in state_dict.items()}

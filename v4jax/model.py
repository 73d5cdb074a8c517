"""The DeepSeek-V4 transformer: embedding, mHC-wrapped blocks (attention + MoE), head, MTP; prefill and decode.

Dimension letters used in shape comments:
  B batch, S sequence (tokens in this call), D model dim (hidden_size), V vocab, n hc_mult residual streams,
  H query heads, K head dim (512), Q q_lora_rank, E routed experts, k experts per token, F expert width,
  W sliding window (128), m compression ratio (4 CSA, 128 HCA), C compressed entries (S//m), T index-list length.
Mesh axes (sharding.py): data, expert, seq, tensor.

Public entry points (all jit-compiled, `cfg` static):
  forward(cfg, params, tokens)                       int32 [B,S] -> float32 logits [B,S,V]
  forward(..., return_hidden=True)                   also the streams after every block [L,B,S,n,D]
  block_forward(cfg, params, layer, streams, tokens) one block on given streams
  mtp_forward(cfg, params, streams, next_tokens)     MTP logits from the final streams and tokens shifted by one
  prefill(cfg, params, tokens, max_len)              logits of every position + decode cache
  decode_step(cfg, params, cache, token)             token [B] -> logits [B,V] + cache
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from . import attention, losses
from .config import ModelConfig
from .hyper import hc_head, hc_post, hc_pre
from .layers import act_dtype, linear_f32, linear_fp8, lookup, rms_norm, rope_inv_freq
from .moe import moe
from .quant import round_to
from .chunks import PREFILL_TOKENS, rows_per_chunk, token_chunks
from .sharding import active_axis_size, constrain

f32 = jnp.float32


def block_params(params: dict, cfg: ModelConfig, layer: int) -> dict:
    """Parameters of block `layer` (layer == num_hidden_layers + j is MTP block j)."""
    if layer < cfg.n_layers:
        return params["layers"][str(layer)]
    return params["mtp"][str(layer - cfg.n_layers)]


def _hc(cfg: ModelConfig, p: dict, sub: str, X):
    return hc_pre(X, p[f"hc_{sub}_fn"], p[f"hc_{sub}_scale"], p[f"hc_{sub}_base"], norm_eps=cfg.rms_norm_eps,
                  hc_eps=cfg.hc_eps, iters=cfg.hc_sinkhorn_iters)


def _ffn(cfg: ModelConfig, p: dict, layer: int, X, tokens, with_routing: bool = False):
    y, post, comb = _hc(cfg, p, "ffn", X)
    out = moe(cfg, p["ffn"], layer, rms_norm(y, p["ffn_norm"]["weight"], cfg.rms_norm_eps), tokens, with_routing)
    if with_routing:
        return hc_post(X, out[0], post, comb), out[1:]
    return hc_post(X, out, post, comb)


def _block(cfg: ModelConfig, p: dict, layer: int, X, tokens, max_len=None, doc_start=None, aux: bool = False):
    """X [B,S,n,D] -> (X', layer cache or None [, aux]). Prefill semantics (positions 0..S-1, or per document).
    aux: also {"attn_in": the attention's normed input [B,S,D], "ids", "scores": the MoE routing} (training)."""
    y, post, comb = _hc(cfg, p, "attn", X)
    xa = rms_norm(y, p["attn_norm"]["weight"], cfg.rms_norm_eps)
    a, cache = attention.prefill(cfg, p["attn"], layer, xa, rope_inv_freq(cfg, layer), max_len, doc_start)
    X = hc_post(X, a, post, comb)
    if aux:
        X, (ids, scores) = _ffn(cfg, p, layer, X, tokens, True)
        return X, cache, {"attn_in": xa, "ids": ids, "scores": scores}
    return _ffn(cfg, p, layer, X, tokens), cache


def _block_chunked(cfg: ModelConfig, p: dict, layer: int, X, tokens, max_len, chunk: int):
    """`_block` (inference prefill, no documents) with the per-token work run `chunk` positions at a time
    (v4jax.chunks): the attention sub-layer's mHC mixing and norm, its query side, and the whole FFN sub-layer
    (mHC, MoE dispatch). Same values as `_block`; only one chunk's transients are alive at a time."""
    def pre(_, Xc):
        y, post, comb = _hc(cfg, p, "attn", Xc)
        return rms_norm(y, p["attn_norm"]["weight"], cfg.rms_norm_eps), post, comb

    xa, post, comb = token_chunks(pre, chunk, X)
    a, cache = attention.prefill(cfg, p["attn"], layer, xa, rope_inv_freq(cfg, layer), max_len, q_chunk=chunk)

    def post_ffn(_, Xc, ac, pc, cc, tc):
        return _ffn(cfg, p, layer, hc_post(Xc, ac, pc, cc), tc)
    return token_chunks(post_ffn, chunk, X, a, post, comb, tokens), cache


def _block_decode(cfg: ModelConfig, p: dict, layer: int, X, token, pos, c):
    y, post, comb = _hc(cfg, p, "attn", X)
    a, c = attention.decode(cfg, p["attn"], layer, rms_norm(y, p["attn_norm"]["weight"], cfg.rms_norm_eps), pos,
                            c, rope_inv_freq(cfg, layer))
    X = hc_post(X, a, post, comb)
    return _ffn(cfg, p, layer, X, token), c


def _embed(cfg: ModelConfig, params: dict, tokens):
    h = lookup(params["embed"]["weight"], tokens).astype(act_dtype(cfg))       # [B,S,D]; deterministic gradient
    X = jnp.broadcast_to(h[..., None, :], h.shape[:-1] + (cfg.hc_mult, cfg.dim))
    return constrain(X, ("batch", "seq_len", None, None))


def _head(cfg: ModelConfig, p: dict, head_w, X):
    y = hc_head(X, p["hc_head_fn"], p["hc_head_scale"], p["hc_head_base"], norm_eps=cfg.rms_norm_eps,
                hc_eps=cfg.hc_eps)
    y = rms_norm(y, p["norm"]["weight"], cfg.rms_norm_eps)
    return linear_f32(head_w, y)


def _check_tokens(cfg: ModelConfig, tokens) -> None:
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be int [B, S], got shape {tokens.shape}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be integers, got {tokens.dtype}")


@partial(jax.jit, static_argnums=(0,), static_argnames=("return_hidden",))
def forward(cfg: ModelConfig, params: dict, tokens: jax.Array, segment_ids: jax.Array | None = None,
            return_hidden: bool = False):
    """int [B, S] -> float32 logits [B, S, V] at every position (and, if asked, the streams after each block).

    segment_ids [B, S] (optional): packed documents as contiguous runs of equal ids. Each token then sees only
    its own document (attention window, compressed entries, indexer), with positions restarting at the
    document start; documents that start at multiples of 128 compute exactly as if each were alone."""
    _check_tokens(cfg, tokens)
    doc_start = None if segment_ids is None else attention.doc_starts(segment_ids)
    X = _embed(cfg, params, tokens)
    hidden = []
    for i in range(cfg.n_layers):
        X, _ = _block(cfg, params["layers"][str(i)], i, X, tokens, doc_start=doc_start)
        hidden.append(X)
    logits = _head(cfg, params, params["head"], X)
    if return_hidden:
        return logits, jnp.stack(hidden)
    return logits


@partial(jax.jit, static_argnums=(0, 2))
def block_forward(cfg: ModelConfig, params: dict, layer: int, streams: jax.Array, tokens: jax.Array):
    """Run block `layer` (MTP blocks: num_hidden_layers + j) on streams [B,S,n,D] -> streams."""
    return _block(cfg, block_params(params, cfg, layer), layer, streams.astype(act_dtype(cfg)), tokens)[0]


@partial(jax.jit, static_argnums=(0,))
def mtp_forward(cfg: ModelConfig, params: dict, streams: jax.Array, next_tokens: jax.Array):
    """MTP block 0: final main-model streams [B,S,n,D] and the ids it embeds (position i gets token i+1;
    the caller shifts) -> float32 logits [B,S,V] predicting token i+2."""
    layer = cfg.n_layers
    p = block_params(params, cfg, layer)
    X, _ = _block(cfg, p, layer, _mtp_input(cfg, p, params, streams, next_tokens), next_tokens)
    return _head(cfg, p, params["head"], X)


def _mtp_input(cfg: ModelConfig, p: dict, params: dict, streams, next_tokens):
    e = rms_norm(lookup(params["embed"]["weight"], next_tokens).astype(act_dtype(cfg)), p["enorm"]["weight"],
                 cfg.rms_norm_eps)
    h = rms_norm(streams.astype(act_dtype(cfg)), p["hnorm"]["weight"], cfg.rms_norm_eps)
    s = linear_fp8(cfg, p["e_proj"], e).astype(f32)[..., None, :] + linear_fp8(cfg, p["h_proj"], h).astype(f32)
    return round_to(s, act_dtype(cfg))


def _head_input(cfg: ModelConfig, p: dict, X):
    """The head's input: hc_head then the final RMSNorm, [B,S,n,D] -> [B,S,D] (activation dtype); `_head` is
    linear_f32(head, _head_input(...))."""
    y = hc_head(X, p["hc_head_fn"], p["hc_head_scale"], p["hc_head_base"], norm_eps=cfg.rms_norm_eps,
                hc_eps=cfg.hc_eps)
    return rms_norm(y, p["norm"]["weight"], cfg.rms_norm_eps)


def forward_train(cfg: ModelConfig, params: dict, tokens: jax.Array, segment_ids: jax.Array | None = None, *,
                  token_mask: jax.Array | None = None, remat: bool = True, with_mtp: bool = True,
                  logits: bool = True, indexer_kl: bool = False, kl_chunk: int = 0) -> dict:
    """The training forward (differentiable; call it inside your own jit/grad).

    token_mask [B, S] (optional, default all True): False on padding. Routing statistics count only real tokens
    (a token whose loss is masked, e.g. a user turn, is still routed and counts); in the MTP block position i
    counts when tokens i and i+1 are both real (its input embeds token i+1; the last position, whose input
    repeats the last token, follows that token).

    Returns a dict:
      "hidden", "mtp_hidden"  [B,S,D] the head's input (after hc_head and the final norm; activation dtype) of the
                              main model and of the MTP block (None without MTP): apply the head chunk-wise with
                              v4jax.losses.xent_sum instead of materialising the logits
      "logits", "mtp_logits"  [B,S,V] f32 (MTP position i predicts token i+2; its last position's input token is
                              a placeholder -- mask its loss); None when logits=False or (MTP) not run
      "load" [L+mtp, E]       real tokens per expert; "balance" [L+mtp] sequence-wise balance losses (over real
                              tokens). Hash layers report them too (their routing is fixed; the caller decides
                              which layers to use)
      "indexer_kl" [n_CSA]    (indexer_kl=True) per CSA layer, the sum over the queries of
                              losses.kl_query_mask of KL(main attention || indexer) (v4jax.losses.indexer_kl;
                              gradients reach only the indexer weights); "indexer_kl_queries": that query count
    remat: recompute each block in the backward pass. kl_chunk: query tokens per chunk of the KL (0 = all)."""
    _check_tokens(cfg, tokens)
    B, S = tokens.shape
    if token_mask is None:
        tmask = jnp.ones((B, S), bool)
    else:
        if token_mask.shape != tokens.shape:
            raise ValueError(f"token_mask has shape {token_mask.shape}, tokens {tokens.shape}")
        tmask = token_mask.astype(bool)
    ds = None if segment_ids is None else attention.doc_starts(segment_ids)

    def run(layer, p, X, toks, msk):
        X, _, aux = _block(cfg, p, layer, X, toks, None, ds, aux=True)
        stats = losses.router_stats(cfg, aux["ids"], aux["scores"], msk)
        if indexer_kl and cfg.ratio(layer) == 4:
            stats["kl"] = losses.indexer_kl(cfg, p["attn"], layer, aux["attn_in"], ds, msk, kl_chunk)
        return X, stats

    def block(layer):
        return jax.checkpoint(partial(run, layer)) if remat else partial(run, layer)

    X = _embed(cfg, params, tokens)
    stats = []
    for i in range(cfg.n_layers):
        X, s = block(i)(params["layers"][str(i)], X, tokens, tmask)
        stats.append(s)
    h = _head_input(cfg, params, X)
    out = {"hidden": h, "logits": linear_f32(params["head"], h) if logits else None,
           "mtp_hidden": None, "mtp_logits": None}
    if with_mtp and cfg.n_mtp:
        layer = cfg.n_layers
        p = block_params(params, cfg, layer)
        nxt = jnp.concatenate([tokens[:, 1:], tokens[:, -1:]], axis=1)
        mmask = tmask & jnp.concatenate([tmask[:, 1:], tmask[:, -1:]], axis=1)
        Xm, s = block(layer)(p, _mtp_input(cfg, p, params, X, nxt), nxt, mmask)
        stats.append(s)
        hm = _head_input(cfg, p, Xm)
        out["mtp_hidden"] = hm
        out["mtp_logits"] = linear_f32(params["head"], hm) if logits else None
    out["load"] = jnp.stack([s["load"] for s in stats])
    out["balance"] = jnp.stack([s["balance"] for s in stats])
    if indexer_kl:
        kl = [s["kl"] for s in stats if "kl" in s]
        out["indexer_kl"] = jnp.stack(kl) if kl else jnp.zeros((0,), f32)
        qmask = losses.kl_query_mask(jnp.zeros((B, S), jnp.int32) if ds is None else ds, tmask)
        out["indexer_kl_queries"] = jnp.sum(qmask.astype(f32))
    return out


# ---- incremental decode -------------------------------------------------------------------------------
def init_cache(cfg: ModelConfig, batch: int, max_len: int) -> dict:
    """An empty decode cache: per layer window ring, compressed entries, compressor tails, indexer keys."""
    return {"pos": jnp.zeros((batch,), jnp.int32),
            "layers": [attention.init_cache(cfg, i, batch, max_len) for i in range(cfg.n_layers)]}


@partial(jax.jit, static_argnums=(0, 3, 4, 5))
def _prefill(cfg: ModelConfig, params: dict, tokens: jax.Array, max_len: int, last_only: bool = False,
             chunk_tokens: int = PREFILL_TOKENS):
    X = _embed(cfg, params, tokens)
    B, S = tokens.shape
    chunk = rows_per_chunk(B, S, chunk_tokens) if active_axis_size("seq") == 1 else 0
    caches = []
    for i in range(cfg.n_layers):
        p = params["layers"][str(i)]
        if chunk:
            X, c = _block_chunked(cfg, p, i, X, tokens, max_len, chunk)
        else:
            X, c = _block(cfg, p, i, X, tokens, max_len)
        caches.append(c)
    logits = _head(cfg, params, params["head"], X[:, -1:] if last_only else X)
    pos = jnp.full((tokens.shape[0],), tokens.shape[1], jnp.int32)
    return logits, {"pos": pos, "layers": caches}


def prefill(cfg: ModelConfig, params: dict, tokens: jax.Array, max_len: int, last_only: bool = False,
            chunk_tokens: int = PREFILL_TOKENS):
    """Run the prompt [B, S] (positions 0..S-1) -> (logits [B, S, V], cache for `decode_step`).

    `max_len` bounds the total length (prompt + generated tokens) the cache can hold. last_only: logits of the
    last position only ([B, 1, V]; at a 129K vocabulary, all positions of a 64K prompt would be 34 GB).
    chunk_tokens: prompts of more than this many tokens (B x S) run each block's per-token work in chunks of
    about this many tokens (v4jax.chunks; same values, bounded memory); 0 turns chunking off."""
    if not isinstance(chunk_tokens, int) or chunk_tokens < 0:
        raise ValueError(f"chunk_tokens must be an int >= 0, got {chunk_tokens!r}")
    _check_tokens(cfg, tokens)
    S = tokens.shape[1]
    if S > max_len:
        raise ValueError(f"prompt has {S} tokens, more than max_len={max_len}")
    if max_len > cfg.max_position_embeddings:
        raise ValueError(f"max_len={max_len} exceeds max_position_embeddings={cfg.max_position_embeddings}")
    return _prefill(cfg, params, tokens, int(max_len), bool(last_only), chunk_tokens)


@partial(jax.jit, static_argnums=(0,), donate_argnums=(2,))
def decode_step(cfg: ModelConfig, params: dict, cache: dict, token: jax.Array):
    """One new token per sequence [B] at position cache["pos"] -> (logits [B, V], updated cache).

    The caller must keep cache["pos"] below the max_len the cache was built with."""
    pos = cache["pos"]
    tok = token.astype(jnp.int32)[:, None]
    X = _embed(cfg, params, tok)
    layers = []
    for i in range(cfg.n_layers):
        X, c = _block_decode(cfg, params["layers"][str(i)], i, X, tok, pos, cache["layers"][i])
        layers.append(c)
    logits = _head(cfg, params, params["head"], X)[:, 0]
    return logits, {"pos": pos + 1, "layers": layers}

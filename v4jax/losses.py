"""Training losses and statistics that need more than the logits: chunked full-vocabulary cross-entropy, router
statistics over real tokens only, and the lightning indexer's KL loss (spec section 7).

  xent_sum(head, h, targets, weights, chunk)            sum_t w_t * CE(h_t head^T, target_t), the head matmul done
                                                        `chunk` tokens at a time (rematerialised in the backward)
  router_stats(cfg, ids, a, mask)                       expert load and sequence-wise balance loss, pads excluded
  kl_query_mask(doc_start, token_mask)                  the queries the indexer KL averages over
  indexer_kl(cfg, p, layer, x, doc_start, mask, chunk)  one CSA layer's summed KL(main attention || indexer)

Cross-entropy at real sizes: logits of a 129K vocabulary are 0.5 MB per token in fp32, so the [B, S, V] logits of a
whole micro-batch (and the same again for their gradient) do not fit. `xent_sum` cuts the sequence into chunks of
about `chunk` tokens (chunk // B positions of every row, so the batch axis keeps its sharding), runs the head matmul,
log-sum-exp and target pick per chunk inside `jax.checkpoint`, and scans over the chunks: only one chunk's logits
exist at a time, forward and backward (the backward recomputes them). Sum order aside, it is the unchunked loss.

Indexer KL (DeepSeek-V3.2's DSA recipe, which the V4 report says V4 follows; spec section 7). For query t of a CSA
layer let P_h(t, s) be head h's attention probability of compressed entry s in the main attention -- the one
softmax over window rows, compressed entries and the sink (spec 2.5 step 5) -- and I(t, s) the index score. The
target is p_t(s) = sum_h P_h(t, s) / sum_{s'} sum_h P_h(t, s') ("main attention scores summed across heads,
L1-normalised") and the loss is KL(p_t || softmax_s I(t, s)), over
  * the set the main attention actually attends: the indexer's top-k selection (k = min(index_topk, entries)) --
    the sparse stage's "KL restricted to the selected set S_t";
  * every visible entry when index_topk covers them all, which is the dense warm-up stage: train.py runs the warm-up
    (`indexer_kl_mode: dense`) with index_topk raised to the number of entries, so the main attention is dense
    over the compressed entries and the target is the dense attention's distribution.
Interpretation (the report gives no formula for V4): V4's attention also has the sliding window and a per-head sink
that the indexer does not score. We take the probabilities of the real softmax (window rows and sink in each head's
normaliser) and restrict them to the compressed entries before the head sum; a head that puts its mass on the window
therefore weighs less in the target, as it contributes less to what the attention reads from the compressed
entries. (The alternative, a softmax over the compressed entries alone per head, weighs all heads equally.)
The indexer's inputs (the block input x and the query latent qr) are detached, and so is the target, so the KL
trains only the indexer's own weights (wq_b, weights_proj, its compressor) and the language-model loss never does
(its top-k is not differentiable anyway): the paper's "indexer input detached from the computational graph".
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from . import attention, compressor, indexer
from .config import ModelConfig
from .layers import linear_f32, rope_inv_freq, rope_table

f32 = jnp.float32
sg = jax.lax.stop_gradient


# ---- cross-entropy --------------------------------------------------------------------------------------
def _xent_block(head: dict, h, targets, weights):
    logits = linear_f32(head, h)                                                      # [B, c, V] f32
    lse = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.sum((lse - tgt) * weights)


def _split(a, n: int, c: int):
    """[B, n*c, ...] -> [n, B, c, ...] (chunks of the sequence; the batch axis stays whole)."""
    return jnp.moveaxis(a.reshape((a.shape[0], n, c) + a.shape[2:]), 1, 0)


def _pad_seq(a, total: int, value=0):
    pad = total - a.shape[1]
    return a if pad == 0 else jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2), constant_values=value)


def seq_chunk(chunk_tokens: int, B: int, S: int) -> int:
    """Positions per chunk for about `chunk_tokens` tokens over B rows (S, i.e. one chunk, when off or larger)."""
    if chunk_tokens <= 0:
        return S
    return max(1, min(S, chunk_tokens // B))


def xent_sum(head: dict, h: jax.Array, targets: jax.Array, weights: jax.Array, chunk: int = 0) -> jax.Array:
    """Weighted cross-entropy sum of the head logits: h [B, S, D] (the normed head input), head {"weight" [V, D]},
    targets int [B, S], weights f32 [B, S] -> f32 scalar sum_t w_t (logsumexp_v(l_t) - l_t[target_t]), l = fp32
    h @ head^T. chunk: tokens per chunk (0 = all logits at once)."""
    B, S, _ = h.shape
    c = seq_chunk(chunk, B, S)
    if c >= S:
        return _xent_block(head, h, targets, weights)
    n = -(-S // c)
    h, targets, weights = (_pad_seq(a, n * c) for a in (h, targets, weights))      # pads carry weight 0
    block = jax.checkpoint(_xent_block)

    def body(acc, xs):
        return acc + block(head, *xs), None
    total, _ = jax.lax.scan(body, jnp.zeros((), f32), (_split(h, n, c), _split(targets, n, c),
                                                       _split(weights.astype(f32), n, c)))
    return total


# ---- router statistics ----------------------------------------------------------------------------------
def router_stats(cfg: ModelConfig, ids: jax.Array, a: jax.Array, mask: jax.Array) -> dict:
    """One MoE layer's statistics over the real tokens: ids [B, S, k] routed experts, a [B, S, E] gate scores,
    mask [B, S] (True = a real token; padding False).

    load [E]: real tokens routed to each expert (for the aux-loss-free bias rule). balance: the sequence-wise
    balance loss sum_i f_i P_i (DeepSeek-V3/V4 form) per row, f_i = E/(k T) * #real tokens of the row routed to
    i, P_i = mean over the row's real tokens of a_i / sum_j a_j, T = the row's real tokens; averaged over the rows
    that have any."""
    E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    m = mask.astype(f32)
    counts = jnp.sum(jax.nn.one_hot(ids, E, dtype=f32), axis=-2) * m[..., None]         # [B, S, E]
    probs = a / jnp.sum(a, -1, keepdims=True) * m[..., None]
    T = jnp.sum(m, axis=1)                                                                # [B]
    Tc = jnp.maximum(T, 1.0)[:, None]
    f = jnp.sum(counts, 1) * (E / k) / Tc
    P = jnp.sum(probs, 1) / Tc
    rows = (T > 0).astype(f32)
    balance = jnp.sum(jnp.sum(f * P, -1) * rows) / jnp.maximum(jnp.sum(rows), 1.0)
    return {"load": jnp.sum(counts, (0, 1)), "balance": balance}


# ---- indexer KL -----------------------------------------------------------------------------------------
def kl_query_mask(doc_start: jax.Array, token_mask: jax.Array, m: int = 4) -> jax.Array:
    """[B, S] bool: real tokens that see at least one completed compressed entry of their own document (the
    queries the indexer KL is defined for)."""
    t = jnp.arange(doc_start.shape[1])
    return token_mask.astype(bool) & ((t + 1) // m > (doc_start + m - 1) // m)


def _kl_block(cfg: ModelConfig, k: int, sink, kv, entries, keys, q, qI, w, t, ds, valid):
    """KL sum over one chunk of queries. q [B,c,H,K], qI [B,c,nI,dI], w [B,c,nI], t [c] positions, ds/valid
    [B,c]; kv [B,S,K], entries [B,C,K], keys [B,C,dI] (the whole sequence)."""
    m, W = 4, cfg.sliding_window
    S, C = kv.shape[1], entries.shape[1]
    scale = cfg.head_dim ** -0.5
    I = indexer.scores(qI, w, keys).astype(f32)                                         # [B, c, C]
    n_vis = (t + 1) // m
    first = (ds + m - 1) // m
    if k < C:   # the entries the main attention reads: the indexer's top-k, as attention.prefill selects them
        sel = indexer.topk(sg(I), n_vis[None, :], k, first)                               # [B, c, k]
        B, c = sel.shape[:2]
        bi, ci = jnp.arange(B)[:, None, None], jnp.arange(c)[None, :, None]
        in_set = jnp.zeros((B, c, C), bool).at[bi, ci, jnp.where(sel >= 0, sel, C)].set(True, mode="drop")
    else:       # all visible entries (dense)
        j = jnp.arange(C)
        in_set = (j < n_vis[None, :, None]) & (j >= first[..., None])
    # main attention logits: the window rows of each query, then the compressed entries (fp32 accumulation)
    jw = jnp.maximum(t - W + 1, 0)[:, None] + jnp.arange(min(S, W))[None, :]                # [c, Wn]
    ok_w = (jw <= t[:, None])[None] & (jw[None] >= ds[..., None])                             # [B, c, Wn]
    rows = jnp.take(kv, jnp.minimum(jw, S - 1), axis=1)                                      # [B, c, Wn, K]
    zw = jnp.einsum("bchk,bcwk->bchw", q, rows, preferred_element_type=f32, precision="highest") * scale
    zc = jnp.einsum("bchk,bnk->bchn", q, entries, preferred_element_type=f32, precision="highest") * scale
    zw = jnp.where(ok_w[:, :, None], zw, -jnp.inf)
    zc = jnp.where(in_set[:, :, None], zc, -jnp.inf)
    sink = sink.astype(f32)[None, None, :]                                                   # [1, 1, H]
    mx = jnp.maximum(jnp.maximum(jnp.max(zw, -1), jnp.max(zc, -1)), sink)                   # [B, c, H]
    Z = jnp.sum(jnp.exp(zw - mx[..., None]), -1) + jnp.sum(jnp.exp(zc - mx[..., None]), -1) + jnp.exp(sink - mx)
    P = jnp.sum(jnp.exp(zc - mx[..., None]) / Z[..., None], axis=2)                         # [B, c, C] head sum
    p = sg(P / jnp.maximum(jnp.sum(P, -1, keepdims=True), jnp.finfo(f32).tiny))
    has = jnp.any(in_set, -1, keepdims=True)
    logq = jax.nn.log_softmax(jnp.where(has, jnp.where(in_set, I, -jnp.inf), 0.0), axis=-1)   # finite rows
    pos = in_set & (p > 0)
    kl = jnp.sum(jnp.where(pos, p * (jnp.log(jnp.where(pos, p, 1.0)) - jnp.where(pos, logq, 0.0)), 0.0), -1)
    return jnp.sum(jnp.where(valid & has[..., 0], kl, 0.0))


def indexer_kl(cfg: ModelConfig, p: dict, layer: int, x: jax.Array, doc_start: jax.Array | None,
               token_mask: jax.Array, chunk: int = 0) -> jax.Array:
    """Sum over the queries of `kl_query_mask` of KL(main attention || indexer) for CSA block `layer` (see the
    module docstring). p: the block's attention params; x [B, S, d] the normed attention input (as
    attention.prefill gets it); chunk: query tokens per chunk (0 = all at once). Gradients reach only the
    indexer's weights."""
    if cfg.ratio(layer) != 4:
        raise ValueError(f"indexer_kl: block {layer} is not a CSA layer (compress ratio {cfg.ratio(layer)})")
    B, S, _ = x.shape
    m, C = 4, S // 4
    if C == 0:
        return jnp.zeros((), f32)
    inv_freq = rope_inv_freq(cfg, layer)
    t = jnp.arange(S)
    ds = jnp.zeros((B, S), jnp.int32) if doc_start is None else doc_start
    x = sg(x)
    # the same intermediates as attention.prefill (XLA merges the duplicate computations)
    cos, sin = rope_table(t[None, :] - ds, inv_freq)
    qr, q, kv = attention._qkv(cfg, p, x, cos, sin)
    entries, _ = compressor.prefill(cfg, p["compressor"], x, m, cfg.head_dim, inv_freq, doc_start=ds)
    keys, _ = compressor.prefill(cfg, p["indexer"]["compressor"], x, m, cfg.index_head_dim, inv_freq,
                                 indexer=True, doc_start=ds)
    qI, w = indexer.queries(cfg, p["indexer"], x, sg(qr), cos, sin)
    q, kv, entries = sg(q), sg(kv), sg(entries)
    valid = kl_query_mask(ds, token_mask, m)
    k = min(cfg.index_topk, C)
    sink = sg(p["attn_sink"])
    c = seq_chunk(chunk, B, S)
    if c >= S:
        return _kl_block(cfg, k, sink, kv, entries, keys, q, qI, w, t, ds, valid)
    n = -(-S // c)
    tp = jnp.arange(n * c)
    pad = lambda a: _pad_seq(a, n * c)
    xs = (_split(pad(q), n, c), _split(pad(qI), n, c), _split(pad(w), n, c), tp.reshape(n, c),
          _split(pad(ds), n, c), _split(pad(valid), n, c))
    block = jax.checkpoint(lambda keys, *a: _kl_block(cfg, k, sink, kv, entries, keys, *a))

    def body(acc, a):
        return acc + block(keys, *a), None
    total, _ = jax.lax.scan(body, jnp.zeros((), f32), xs)
    return total

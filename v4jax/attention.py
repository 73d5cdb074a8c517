"""Hybrid attention (spec 2.5): a 128-token sliding window plus CSA (indexer top-k) or HCA (all) compressed
entries, one softmax with a per-head sink, then inverse RoPE and the grouped output projection.

Prefill attends over the pool [S raw KV rows | S//m compressed entries]; decode over [W-slot ring | compressed
cache]. Which pool rows a query may read is given entirely by its index list (-1 = masked), so causality and the
completion rule `entry j visible at t iff j < (t + 1) // m` live in the index sets built here.

Decode cache storage (`cfg.kv_cache_format`, spec 3.1/3.2): "bf16" keeps window rows and compressed entries as
activations (the reference). "fp8" keeps each of them as one uint8 row in the production layout
[nope FP8 e4m3 | RoPE dims bf16 | one UE8M0 scale per 64 nope values | zero pad to 8 B] (584 B at head_dim 512)
and the indexer keys as FP4 (indexer.store_keys, 68 B). The stored values already carry the FP8/FP4 simulation,
so with `quant_sim` on both formats hold the same numbers and decode gives the same logits. An fp8 decode step
gathers only the rows its query reads (window ring in ring order, the top-k CSA entries or all HCA entries),
dequantises those and runs sparse attention on the compact [B, T, hd] block with index list 0..T-1 (-1 kept).
`cache_bytes_per_token` / `cache_bytes` account for the memory.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import indexer as indexer_kernels     # a module: pallas_kernels.indexer imports v4jax.indexer
from pallas_kernels import grouped_matmul as gm
from pallas_kernels import linear as skinny
from pallas_kernels.grouped_matmul import grouped_matmul
from pallas_kernels.sparse_attention import Layout, sparse_attention

from . import compressor, indexer
from .chunks import token_chunks
from jax.sharding import PartitionSpec as P

from .config import ModelConfig
from .sharding import active_axis_size
from .layers import act_dtype, act_einsum, apply_rope, linear_fp8, rms_norm, rope_table, weight
from . import quant
from .quant import round_to

f32 = jnp.float32


# ---- index sets ---------------------------------------------------------------------------------------
def window_idx_prefill(S: int, W: int, start=0, width: int | None = None) -> jax.Array:
    """[S, min(S, W)]: for queries at positions start .. start+S-1, tokens max(0, t-W+1) .. t in ascending
    order, -1 padded at the end (width: the list length, default min(S, W))."""
    t = start + jnp.arange(S)[:, None]
    j = jnp.maximum(t - W + 1, 0) + jnp.arange(min(S, W) if width is None else width)[None, :]
    return jnp.where(j > t, -1, j).astype(jnp.int32)


def window_idx_decode(pos: jax.Array, W: int) -> jax.Array:
    """pos [B] -> ring slots [B, W], oldest to newest, -1 for slots not yet written."""
    i = jnp.arange(W)[None, :]
    p = pos[:, None]
    return jnp.where(p >= W - 1, (p + 1 + i) % W, jnp.where(i <= p, i, -1)).astype(jnp.int32)


def all_entries_idx(n_visible: jax.Array, C: int, first: jax.Array | int = 0) -> jax.Array:
    """HCA: every completed entry, ascending: [..., C] with -1 unless first <= j < n_visible."""
    j = jnp.arange(C)
    ok = (j < n_visible[..., None]) & (j >= jnp.asarray(first)[..., None])
    return jnp.where(ok, j, -1).astype(jnp.int32)


def doc_starts(segment_ids: jax.Array) -> jax.Array:
    """[B, S] segment ids (documents are contiguous runs) -> index of each token's document start [B, S]."""
    t = jnp.arange(segment_ids.shape[1])
    start = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
    return jax.lax.cummax(jnp.where(start, t, 0), axis=1).astype(jnp.int32)


def _offset(idx: jax.Array, off: int) -> jax.Array:
    return jnp.where(idx >= 0, idx + off, -1)


# ---- shared pieces ------------------------------------------------------------------------------------
def _head_norm(q: jax.Array, eps: float) -> jax.Array:
    """Weightless per-head RMS normalisation as the reference's bf16 ops: each op's result rounded to q.dtype
    (square, mean with fp32 accumulation, + eps, rsqrt, multiply)."""
    r = lambda v: round_to(v, q.dtype).astype(f32)
    q32 = q.astype(f32)
    ms = r(jnp.mean(r(q32 * q32), axis=-1, keepdims=True))
    return round_to(q32 * r(jax.lax.rsqrt(r(ms + eps))), q.dtype)


def _q(cfg: ModelConfig, p: dict, x: jax.Array, cos, sin):
    """x [B, S, d] -> qr [B,S,q_lora], q [B,S,H,hd] (head-normed, RoPE'd)."""
    B, S, _ = x.shape
    qr = rms_norm(linear_fp8(cfg, p["wq_a"], x), p["q_norm"]["weight"], cfg.rms_norm_eps)
    q = linear_fp8(cfg, p["wq_b"], qr).reshape(B, S, cfg.num_attention_heads, cfg.head_dim)
    return qr, apply_rope(_head_norm(q, cfg.rms_norm_eps), cos[:, :, None], sin[:, :, None])


def _kv(cfg: ModelConfig, p: dict, x: jax.Array, cos, sin):
    """x [B, S, d] -> kv [B,S,hd] (RoPE'd, FP8-simulated)."""
    kv = rms_norm(linear_fp8(cfg, p["wkv"], x), p["kv_norm"]["weight"], cfg.rms_norm_eps)
    return compressor.kv_quant_sim(cfg, apply_rope(kv, cos, sin))


def _qkv(cfg: ModelConfig, p: dict, x: jax.Array, cos, sin):
    """x [B, S, d] -> qr [B,S,q_lora], q [B,S,H,hd], kv [B,S,hd]."""
    return *_q(cfg, p, x, cos, sin), _kv(cfg, p, x, cos, sin)


def _output(cfg: ModelConfig, p: dict, o: jax.Array, cos, sin) -> jax.Array:
    """o [B,S,H,hd] -> inverse RoPE -> per-group wo_a (bf16 einsum) -> wo_b (FP8 linear) -> [B,S,d]."""
    B, S, H, hd = o.shape
    g = cfg.o_groups
    o = apply_rope(o, cos[:, :, None], sin[:, :, None], inverse=True).reshape(B, S, g, H * hd // g)
    dt = act_dtype(cfg)
    r, w, s = cfg.o_lora_rank, p["wo_a"]["weight"], p["wo_a"].get("scale")
    if (B * S <= skinny.MAX_ROWS and dt == jnp.bfloat16 and r % 128 == 0 and gm.default_backend() == "gpu"
            and active_axis_size("tensor") == 1):
        # decode on GPU: the g group products as ONE grouped-matmul call over the stored weight viewed as
        # [g, r, in] (its decode launch, split-K) -- not g skinny calls on sliced weights (each slice a copy) nor
        # the grouped einsum (which dequantises the whole FP8 weight to bf16 first)
        node = {"weight": w.reshape(g, r, -1)} | ({"scale": s.reshape(g, r // 128, -1)} if s is not None else {})
        rows = o.astype(dt).transpose(2, 0, 1, 3).reshape(g * B * S, -1)             # grouped by output group
        y = grouped_matmul(rows, node, jnp.full((g,), B * S, jnp.int32), out_dtype=dt)
        o = y.reshape(g, B, S, r).transpose(1, 2, 0, 3)
    else:
        wo_a = weight(p["wo_a"], dt).reshape(g, r, -1)
        if dt == jnp.bfloat16:      # same numerics; its backward runs bf16 x bf16 (layers.act_einsum)
            o = act_einsum("bsgi,gri->bsgr", o.astype(dt), wo_a)
        else:
            o = round_to(jnp.einsum("bsgi,gri->bsgr", o.astype(dt), wo_a, preferred_element_type=f32,
                                    precision="highest"), dt)
    return linear_fp8(cfg, p["wo_b"], o.reshape(B, S, -1))


def _attend(cfg: ModelConfig, p: dict, q, pool, idx, layout: Layout | None = None):
    """layout: how prefill built idx (window band + compressed entries), so the backward can run as dense banded
    matmuls (pallas_kernels.sparse_attention.banded_backward); None at decode and in traced-offset chunks."""
    return sparse_attention(q, pool, idx, p["attn_sink"].astype(f32), cfg.head_dim ** -0.5, layout=layout)


def _compressed_idx(cfg: ModelConfig, p: dict, m: int, x, qr, cos, sin, keys, n_visible, C: int, first):
    """Each query's list of compressed entries (0..C-1, -1 padded): CSA (m = 4) the indexer's top-k of the
    visible entries (scored by the kernel dispatch), HCA every visible entry."""
    if m == 4:
        qI, w = indexer.queries(cfg, p["indexer"], x, qr, cos, sin)
        # the scores only choose the top-k (integer indices), so no gradient reaches them from the model's output;
        # stop_gradient states it, so no backward of the scores can ever be traced (measured on the 1b training
        # step: no change -- autodiff's symbolic zeros had pruned it already). The indexer is trained by its own
        # KL loss (v4jax.losses.indexer_kl), which computes its scores separately.
        sg = jax.lax.stop_gradient
        scores = indexer_kernels.index_scores(sg(qI), sg(w), sg(keys))
        return indexer_kernels.index_topk(scores, n_visible, min(cfg.index_topk, C), first)
    return all_entries_idx(n_visible, C, first)


# ---- prefill ------------------------------------------------------------------------------------------
def prefill(cfg: ModelConfig, p: dict, layer: int, x: jax.Array, inv_freq, max_len: int | None = None,
            doc_start: jax.Array | None = None, q_chunk: int = 0):
    """x [B, S, d] (normed block input) -> (out [B, S, d], cache dict for decode or None).

    doc_start [B, S] (packed rows, see `doc_starts`): each token sees only its own document -- positions restart
    at the document start, the window stops there, and a compressed entry is visible only if its whole block
    lies inside the query's document. With documents starting at multiples of 128, every document computes
    exactly as if it were alone.

    q_chunk > 0 (long prefills, see v4jax.chunks): the KV side (raw KV rows, compressed entries, indexer keys:
    at most hd values per token) is computed for the whole sequence, the query side (q projections, indexer
    scores and top-k, attention, output projection) `q_chunk` queries at a time -- the same values, with only one
    chunk's [tokens, H x hd] transients alive."""
    B, S, _ = x.shape
    m, W, hd = cfg.ratio(layer), cfg.sliding_window, cfg.head_dim
    t = jnp.arange(S)
    if doc_start is None:
        doc_start = jnp.zeros((B, S), jnp.int32)
    if active_axis_size("seq") > 1:
        out, parts = prefill_context_parallel(cfg, p, layer, x, inv_freq, doc_start, with_cache=max_len is not None)
        if max_len is None:
            return out, None
        return out, _prefill_cache(cfg, layer, parts.pop("tail"), parts, S, max_len)
    cos, sin = rope_table(t[None, :] - doc_start, inv_freq)
    kv = _kv(cfg, p, x, cos, sin)
    pool, keys, n = kv, None, S // m if m else 0
    cache = {}
    if m:
        entries, state = compressor.prefill(cfg, p["compressor"], x, m, hd, inv_freq, doc_start=doc_start)
        cache.update(comp_entries=entries, comp_state=state)
        if m == 4:
            keys, istate = compressor.prefill(cfg, p["indexer"]["compressor"], x, m, cfg.index_head_dim,
                                              inv_freq, indexer=True, doc_start=doc_start)
            cache.update(index_keys=keys, index_state=istate)
        if n:
            pool = jnp.concatenate([kv, entries], axis=1)

    def queries(s0, xc, cosc, sinc, dsc):             # the queries at positions s0 .. s0 + len - 1
        qr, q = _q(cfg, p, xc, cosc, sinc)
        c = xc.shape[1]
        idx = window_idx_prefill(c, W, start=s0, width=min(S, W))[None]
        idx = jnp.where(idx >= dsc[..., None], idx, -1)
        if n:
            tc = s0 + jnp.arange(c)
            cidx = _compressed_idx(cfg, p, m, xc, qr, cosc, sinc, keys, (tc + 1) // m, n, (dsc + m - 1) // m)
            idx = jnp.concatenate([idx, _offset(cidx, S)], axis=-1)
        layout = None           # the lists' structure, when the chunk's start is static (always in training)
        if isinstance(s0, int):
            layout = Layout(window=min(S, W), offset=s0, comp_start=S if n else None, ratio=m if s0 == 0 else 0)
        return _output(cfg, p, _attend(cfg, p, q, pool, idx, layout), cosc, sinc)

    out = token_chunks(queries, q_chunk, x, cos, sin, doc_start)
    if max_len is None:
        return out, None
    return out, _prefill_cache(cfg, layer, kv[:, max(S - W, 0):], cache, S, max_len)


# ---- context parallelism -------------------------------------------------------------------------------
def prefill_context_parallel(cfg: ModelConfig, p: dict, layer: int, x: jax.Array, inv_freq, doc_start,
                             with_cache: bool = False):
    """`prefill` with the sequence split over the mesh axis `seq`, inside `jax.shard_map` -> out [B, S, d], and
    with_cache: the parts of a decode cache (else None).

    Shard j holds tokens [j L, (j+1) L) and computes their attention. From other shards it receives only: the
    previous shard's last W-1 raw KV rows (window; ppermute), the previous block's compressor rows (CSA overlap;
    ppermute) and every shard's compressed entries and indexer keys (all_gather of S/m rows). L must be a
    multiple of 128 (no compression block straddles shards) and at least the window. The decode cache needs
    nothing more: the last shard's W raw rows and compressor streaming state, and the gathered entries/keys."""
    mesh = jax.sharding.get_abstract_mesh()
    sizes = dict(mesh.shape)
    n = sizes["seq"]
    B, S, _ = x.shape
    L = S // n
    if S % n or L % 128 or L < cfg.sliding_window:
        raise ValueError(f"context parallelism over seq={n}: the sequence length {S} must split into shards whose "
                         f"length is a multiple of 128 and at least the window {cfg.sliding_window}")
    batch = "data" if sizes.get("data", 1) > 1 and B % sizes["data"] == 0 else None
    spec = P(batch, "seq")

    def local(p, x, ds):
        out, parts = _prefill_shard(cfg, p, layer, x, ds, inv_freq, jax.lax.axis_index("seq") * L, S, n)
        if not with_cache:
            return out, None
        per_shard = {k: jax.tree.map(lambda a: a[None], v) for k, v in parts.items() if k in PER_SHARD}
        return out, {**per_shard, **{k: v for k, v in parts.items() if k not in PER_SHARD}}

    def part_spec(k):            # per-shard parts stacked on a leading axis; gathered parts are the same everywhere
        return P("seq", batch) if k in PER_SHARD else P(batch)
    parts_abs = _cache_part_names(cfg, layer) if with_cache else None
    out_specs = (spec, {k: jax.tree.map(lambda _: part_spec(k), v) for k, v in parts_abs.items()}
                 if with_cache else None)
    p_spec = jax.tree.map(lambda _: P(), p)
    out, parts = jax.shard_map(local, mesh=mesh, in_specs=(p_spec, spec, spec), out_specs=out_specs,
                               check_vma=False)(p, x, doc_start)   # Pallas kernels inside (see moe.py)
    if with_cache:       # the last shard's tail rows and streaming state are the sequence's
        parts = {k: jax.tree.map(lambda a: a[-1], v) if k in PER_SHARD else v for k, v in parts.items()}
    return out, parts


PER_SHARD = ("tail", "comp_state", "index_state")


def _cache_part_names(cfg: ModelConfig, layer: int) -> dict:
    """The cache parts a prefill layer hands to `_prefill_cache` (a pytree skeleton for shard_map out_specs)."""
    m = cfg.ratio(layer)
    parts = {"tail": 0}
    if m:
        parts.update(comp_entries=0, comp_state=(0, 0))
    if m == 4:
        parts.update(index_keys=0, index_state=(0, 0))
    return parts


def _prefill_shard(cfg: ModelConfig, p: dict, layer: int, x, ds, inv_freq, s0, S: int, n: int):
    """One sequence shard: x [b, L, d] at global positions s0.., ds [b, L] document starts (global)."""
    b, L, _ = x.shape
    m, W, hd = cfg.ratio(layer), cfg.sliding_window, cfg.head_dim
    t = s0 + jnp.arange(L)
    cos, sin = rope_table(t[None, :] - ds, inv_freq)
    qr, q, kv = _qkv(cfg, p, x, cos, sin)
    to_next = [(i, i + 1) for i in range(n - 1)]
    prev_tail = jax.lax.ppermute(kv[:, L - (W - 1):], "seq", to_next)              # zeros on shard 0
    pool = jnp.concatenate([prev_tail, kv], axis=1)                                  # [b, W-1+L, K]
    g = window_idx_prefill(L, W, start=s0, width=W)[None]                         # global window tokens
    idx = jnp.where((g >= 0) & (g >= ds[..., None]), g - s0 + (W - 1), -1)
    parts = {"tail": kv[:, L - W:]}                                                 # L >= W
    if m:
        n_visible, first, C = (t + 1) // m, (ds + m - 1) // m, S // m

        def gathered(pc, D, is_indexer):
            prev = None
            if m == 4:
                tail = compressor.project_tail(pc, x, m, s0)
                prev = tuple(jax.lax.ppermute(a, "seq", to_next) for a in tail)
            e, state = compressor.prefill(cfg, pc, x, m, D, inv_freq, indexer=is_indexer, doc_start=ds,
                                          start=s0, prev=prev)
            return jax.lax.all_gather(e, "seq", axis=1, tiled=True), state          # [b, S//m, D]

        entries, parts["comp_state"] = gathered(p["compressor"], hd, False)
        parts["comp_entries"] = entries
        keys = None
        if m == 4:
            keys, parts["index_state"] = gathered(p["indexer"]["compressor"], cfg.index_head_dim, True)
            parts["index_keys"] = keys
        cidx = _compressed_idx(cfg, p, m, x, qr, cos, sin, keys, n_visible, C, first)
        pool = jnp.concatenate([pool, entries], axis=1)
        idx = jnp.concatenate([idx, _offset(cidx, W - 1 + L)], axis=-1)
    o = _attend(cfg, p, q, pool, idx, Layout(window=W, offset=W - 1, comp_start=W - 1 + L if m else None))
    return _output(cfg, p, o, cos, sin), parts


# ---- cache storage ------------------------------------------------------------------------------------
def kv_bytes(cfg: ModelConfig, fmt: str | None = None) -> int:
    """Bytes of one cached main KV row (window row or compressed entry) in cache format `fmt`."""
    if (fmt or cfg.kv_cache_format) == "bf16":
        return cfg.head_dim * jnp.dtype(act_dtype(cfg)).itemsize
    nope, rd = cfg.nope_head_dim, cfg.qk_rope_head_dim
    return -(-(nope + 2 * rd + nope // 64) // 8) * 8


def store_kv(cfg: ModelConfig, kv: jax.Array) -> jax.Array:
    """Main KV [..., hd] (activation dtype, nope dims FP8-simulated) -> cache rows [..., kv_bytes].

    fp8: the nope dims are quantised with the reference's rule (blocks of 64, E8M0 scale); on values that are
    already FP8-simulated this is lossless (the recomputed scale is s or s/2, and doubling an E4M3 value is
    exact), so the row decodes to the same numbers. The RoPE dims are stored as bf16."""
    if cfg.kv_cache_format == "bf16":
        return kv.astype(act_dtype(cfg))
    nope = cfg.nope_head_dim
    q, s = quant.act_quant_fp8(kv[..., :nope], 64)                                    # E4M3, f32 [..., nope/64]
    u8 = lambda a: jax.lax.bitcast_convert_type(a, jnp.uint8)
    rope = u8(round_to(kv[..., nope:], jnp.bfloat16))                                 # [..., rd, 2]
    parts = [u8(q), rope.reshape(*rope.shape[:-2], -1), u8(quant.f32_to_e8m0(s))]
    pad = kv_bytes(cfg) - sum(a.shape[-1] for a in parts)
    parts.append(jnp.zeros(kv.shape[:-1] + (pad,), jnp.uint8))
    return jnp.concatenate(parts, axis=-1)


def load_kv(cfg: ModelConfig, rows: jax.Array) -> jax.Array:
    """Inverse of `store_kv`: cache rows [..., kv_bytes] -> [..., hd] in the activation dtype (exact)."""
    if cfg.kv_cache_format == "bf16":
        return rows
    nope, rd, dt = cfg.nope_head_dim, cfg.qk_rope_head_dim, act_dtype(cfg)
    lead = rows.shape[:-1]
    q = jax.lax.bitcast_convert_type(rows[..., :nope], jnp.float8_e4m3fn).astype(f32)
    rope = jax.lax.bitcast_convert_type(rows[..., nope:nope + 2 * rd].reshape(*lead, rd, 2), jnp.bfloat16)
    sc = jax.lax.bitcast_convert_type(rows[..., nope + 2 * rd:nope + 2 * rd + nope // 64], jnp.float8_e8m0fnu)
    v = (q.reshape(*lead, nope // 64, 64) * quant.e8m0_to_f32(sc)[..., None]).reshape(*lead, nope)
    return jnp.concatenate([v.astype(dt), rope.astype(dt)], axis=-1)


def init_cache(cfg: ModelConfig, layer: int, batch: int, max_len: int) -> dict:
    """Empty decode state of one layer (spec 3.1), rows stored in cfg.kv_cache_format."""
    m, W, hd = cfg.ratio(layer), cfg.sliding_window, cfg.head_dim
    bf16 = cfg.kv_cache_format == "bf16"     # else rows of uint8 bytes
    kv_row, key_row = ((hd, cfg.index_head_dim) if bf16 else (kv_bytes(cfg), indexer.key_bytes(cfg)))
    dt = act_dtype(cfg) if bf16 else jnp.uint8
    c = {"window": jnp.zeros((batch, W, kv_row), dt)}
    if m:
        rows, ch = compressor.state_shape(m, hd)
        c["comp"] = jnp.zeros((batch, -(-max_len // m), kv_row), dt)
        c["comp_kv"] = jnp.zeros((batch, rows, ch), f32)
        c["comp_score"] = jnp.full((batch, rows, ch), -jnp.inf, f32)
    if m == 4:
        dI = cfg.index_head_dim
        rows, ch = compressor.state_shape(m, dI)
        c["index_keys"] = jnp.zeros((batch, -(-max_len // m), key_row), dt)
        c["index_kv"] = jnp.zeros((batch, rows, ch), f32)
        c["index_score"] = jnp.full((batch, rows, ch), -jnp.inf, f32)
    return c


def _prefill_cache(cfg: ModelConfig, layer: int, kv_tail, parts: dict, S: int, max_len: int) -> dict:
    """The decode cache after a prefill of S tokens: kv_tail [B, min(S, W), K] = the last raw KV rows, parts =
    compressed entries / indexer keys of the whole prompt and the compressors' streaming state."""
    B = kv_tail.shape[0]
    W = cfg.sliding_window
    c = init_cache(cfg, layer, B, max_len)
    last = jnp.arange(max(S - W, 0), S)
    c["window"] = c["window"].at[:, last % W].set(store_kv(cfg, kv_tail))
    if "comp_entries" in parts:
        n = parts["comp_entries"].shape[1]
        if n:
            c["comp"] = c["comp"].at[:, :n].set(store_kv(cfg, parts["comp_entries"]))
        c["comp_kv"], c["comp_score"] = parts["comp_state"]
    if "index_keys" in parts:
        n = parts["index_keys"].shape[1]
        if n:
            c["index_keys"] = c["index_keys"].at[:, :n].set(indexer.store_keys(cfg, parts["index_keys"]))
        c["index_kv"], c["index_score"] = parts["index_state"]
    return c


def cache_bytes(cfg: ModelConfig, max_len: int, fmt: str | None = None, batch: int = 1) -> int:
    """Exact bytes of `model.init_cache(cfg, batch, max_len)` in format `fmt` (default cfg.kv_cache_format):
    every layer's window ring, compressed entries, indexer keys and fp32 compressor streaming state, plus the
    position counter. Shape-only (jax.eval_shape), so it costs no memory at Flash/Pro sizes."""
    c = cfg.replace(kv_cache_format=fmt or cfg.kv_cache_format)
    shapes = jax.eval_shape(lambda: [init_cache(c, i, batch, max_len) for i in range(c.n_layers)])
    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(shapes)) + batch * 4


def cache_bytes_per_token(cfg: ModelConfig, fmt: str | None = None, seq_len: int | None = None) -> float:
    """KV-cache bytes per token of one sequence in format `fmt` (default cfg.kv_cache_format).

    seq_len None: the growing part only -- per main layer, one compressed entry per m tokens plus, on CSA layers,
    one indexer key per 4 tokens (window rings and compressor tails excluded), i.e. spec 3.2's table: Flash 3514
    ("fp8": FP8 entries of 584 B + FP4 keys of 68 B) / 6880 ("bf16"), Pro 5031 / 9848. With seq_len: everything
    a decode cache for a sequence of that length holds (`cache_bytes(cfg, seq_len, fmt)`: rings, fp32 compressor
    state, entries rounded up to whole blocks) divided by seq_len. The MTP block keeps no decode cache here."""
    fmt = fmt or cfg.kv_cache_format
    if seq_len is not None:
        return cache_bytes(cfg, seq_len, fmt) / seq_len
    total = 0.0
    for layer in range(cfg.n_layers):
        m = cfg.ratio(layer)
        if m:
            total += kv_bytes(cfg, fmt) / m
        if m == 4:
            total += indexer.key_bytes(cfg, fmt) / m
    return total


# ---- decode -------------------------------------------------------------------------------------------
def _write(buf: jax.Array, slot: jax.Array, row: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """buf [B, N, D]; per sequence write row [B, D] at slot [B] (where mask, if given)."""
    if mask is not None:
        row = jnp.where(mask[:, None], row, buf[jnp.arange(buf.shape[0]), slot])
    return jax.vmap(lambda b, i, r: b.at[i].set(r))(buf, slot, row)


def _gather_rows(buf: jax.Array, idx: jax.Array) -> jax.Array:
    """buf [B, N, R], idx [B, T] (-1 = none) -> rows [B, T, R] (row 0 where idx is -1; masked by the caller)."""
    return jnp.take_along_axis(buf, jnp.maximum(idx, 0)[..., None], axis=1)


def decode(cfg: ModelConfig, p: dict, layer: int, x: jax.Array, pos: jax.Array, c: dict, inv_freq):
    """One token per sequence: x [B, 1, d], pos [B] -> (out [B, 1, d], new layer cache)."""
    m, W, hd = cfg.ratio(layer), cfg.sliding_window, cfg.head_dim
    cos, sin = rope_table(pos[:, None], inv_freq)
    qr, q, kv = _qkv(cfg, p, x, cos, sin)
    c = dict(c)
    c["window"] = _write(c["window"], pos % W, store_kv(cfg, kv[:, 0]))
    widx, cidx = window_idx_decode(pos, W), None
    if m:
        x0 = x[:, 0]
        n_visible = (pos + 1) // m
        if m == 4:  # the indexer runs first: its compressor may complete a key this step
            key, done, st = compressor.decode(cfg, p["indexer"]["compressor"], x0, pos,
                                              (c["index_kv"], c["index_score"]), m, cfg.index_head_dim,
                                              inv_freq, indexer=True)
            c["index_keys"] = _write(c["index_keys"], pos // m, indexer.store_keys(cfg, key), done)
            c["index_kv"], c["index_score"] = st
        entry, done, st = compressor.decode(cfg, p["compressor"], x0, pos, (c["comp_kv"], c["comp_score"]),
                                            m, hd, inv_freq)
        c["comp"] = _write(c["comp"], pos // m, store_kv(cfg, entry), done)
        c["comp_kv"], c["comp_score"] = st
        C = c["comp"].shape[1]
        if m == 4:
            qI, w = indexer.queries(cfg, p["indexer"], x, qr, cos, sin)
            s = indexer_kernels.cached_index_scores(qI, w, c["index_keys"])[:, 0]
            cidx = indexer_kernels.index_topk(s, n_visible, min(cfg.index_topk, C))
        else:
            cidx = all_entries_idx(n_visible, C)
    if cfg.kv_cache_format == "bf16":     # the kernel gathers straight from [ring | compressed cache]
        pool, idx = c["window"], widx
        if m:
            pool = jnp.concatenate([pool, c["comp"]], axis=1)
            idx = jnp.concatenate([idx, _offset(cidx, W)], axis=-1)
    else:                                 # gather the rows this query reads, dequantise only those
        rows = [_gather_rows(c["window"], widx)] + ([_gather_rows(c["comp"], cidx)] if m else [])
        pool = load_kv(cfg, jnp.concatenate(rows, axis=1))                                # [B, T, hd]
        idx = widx if cidx is None else jnp.concatenate([widx, cidx], axis=-1)
        idx = jnp.where(idx >= 0, jnp.arange(idx.shape[-1], dtype=jnp.int32), -1)
    o = _attend(cfg, p, q, pool, idx[:, None, :])
    return _output(cfg, p, o, cos, sin), c

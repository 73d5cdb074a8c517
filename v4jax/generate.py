"""Sampling loop on top of `model.prefill` / `model.decode_step`: the `Generator` of the public API.

    gen = Generator(cfg, params, tokenizer)
    [r] = gen.generate(["Once upon a time"], max_new_tokens=64, temperature=0.6, seed=1)
    r.text, r.tokens, r.finish_reason, r.stats.decode_tokens_per_s
    reply = gen.chat([{"role": "user", "content": "hi"}], thinking="high", max_new_tokens=256)
    reply.message["reasoning_content"], reply.message["content"]

How it runs:
  * Prefill: one jit-compiled call per distinct prompt length (prompts of equal length share it); only the
    last position's logits leave the device. The caches are stacked along the batch axis: positions live in
    cache["pos"] per sequence, so a batch may mix prompt lengths.
    With `prefill_chunk=n`, a prompt is prefilled only up to the last multiple of n and its remaining
    (< n) tokens are fed through the decode loop, so prefill compiles once per multiple of n instead of once
    per length (what a multi-turn chat wants); prompts shorter than n need no prefill at all.
  * Decode runs on device in chunks: one compiled `lax.while_loop` feeds each sequence's last token through
    the decode body, then either takes the next prompt token (a forced token) or samples one in-graph, up to
    `chunk` steps, with the cache donated (updated in place). The loop exits early once every sequence is
    done. Between chunks the host streams text, checks stop strings and hands in the next forced tokens.
  * Sampling (in-graph, fp32): greedy = argmax; otherwise the reference's exponential trick,
    argmax(softmax(logits / T) / Exp(1) noise), optionally after top-k then top-p (nucleus) filtering. The
    noise of sample t of sequence b uses fold_in(fold_in(PRNGKey(seed), t), b): a fixed seed reproduces, and a
    sequence's draws do not depend on the other sequences of the batch.
  * A finished sequence (EOS sampled, budget spent, or a stop string seen by the host) is fed EOS, its position
    stops advancing and its outputs are masked; EOS itself is not part of `tokens` / `text`.
  * Ids the tokenizer cannot decode (the model's vocab is padded past the tokenizer's) are never sampled.

Timing: compilation (ahead of time, cached per shape and shared by Generators over the same model layout) is
reported apart from prefill and decode time, so tokens/s are not swamped by compile time on a first call.
"""
from __future__ import annotations

import dataclasses
import time
from functools import partial
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import chat as chat_format
from . import model
from .config import ModelConfig

__all__ = ["Generator", "GenerationResult", "GenerationStats", "sample_logits", "GREEDY", "SAMPLE", "FILTERED"]

FINISH_EOS, FINISH_STOP, FINISH_LENGTH = "eos", "stop", "length"
GREEDY, SAMPLE, FILTERED = 0, 1, 2     # sampling modes (a traced int: switching mode does not recompile)

# The decode body without decode_step's own jit wrapper (it would be inlined into our loop either way).
_decode_body = getattr(model.decode_step, "__wrapped__", model.decode_step)


# ---- in-graph sampling ---------------------------------------------------------------------------------
def _filter_top_k_top_p(x: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """x [B,V] scaled logits -> x with everything outside the top k, then outside the top-p nucleus, at -inf.

    top_k <= 0: no top-k; top_p >= 1: the whole (top-k) distribution. Ties at the threshold are kept."""
    V = x.shape[-1]
    s = -jnp.sort(-x, axis=-1)                                                   # [B,V] descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
    in_k = jnp.arange(V)[None, :] < k
    p = jax.nn.softmax(jnp.where(in_k, s, -jnp.inf), axis=-1)
    before = jnp.cumsum(p, axis=-1) - p                                          # mass ranked above each entry
    keep = (in_k & (before < top_p)).at[:, 0].set(True)
    n_keep = jnp.sum(keep, axis=-1)                                              # [B] >= 1
    thresh = jnp.take_along_axis(s, (n_keep - 1)[:, None], axis=-1)              # [B,1]
    return jnp.where(x >= thresh, x, -jnp.inf)


def sample_logits(logits: jax.Array, key: jax.Array, step, *, mode=SAMPLE, temperature=1.0, top_p=1.0, top_k=0,
                  vocab_limit=None) -> jax.Array:
    """logits [B,V] -> token ids int32 [B].

    mode: GREEDY (argmax), SAMPLE (the reference's exponential trick: argmax(softmax(logits / T) / Exp(1) noise))
    or FILTERED (the same after top-k, then top-p filtering). step (scalar or [B]): which draw of each sequence
    this is; sequence b's noise comes from fold_in(fold_in(key, step[b]), b). vocab_limit masks ids >= it.
    Everything may be traced; the branches run under lax.cond, so greedy decoding skips the noise and
    unfiltered sampling skips the sort."""
    x = logits.astype(jnp.float32)
    B, V = x.shape
    if vocab_limit is not None:
        x = jnp.where(jnp.arange(V)[None, :] < vocab_limit, x, -jnp.inf)
    mode = jnp.asarray(mode, jnp.int32)
    steps = jnp.broadcast_to(jnp.asarray(step, jnp.int32), (B,))

    def greedy(x):
        return jnp.argmax(x, axis=-1).astype(jnp.int32)

    def sample(x):
        x = x / jnp.maximum(jnp.asarray(temperature, jnp.float32), 1e-5)
        x = jax.lax.cond(mode == FILTERED,
                         lambda x: _filter_top_k_top_p(x, jnp.asarray(top_k, jnp.int32),
                                                       jnp.asarray(top_p, jnp.float32)),
                         lambda x: x, x)
        probs = jax.nn.softmax(x, axis=-1)
        keys = jax.vmap(lambda s, b: jax.random.fold_in(jax.random.fold_in(key, s), b))(steps, jnp.arange(B))
        noise = jax.vmap(lambda k: jax.random.exponential(k, (V,), jnp.float32))(keys)   # Exp(1) [B,V]
        return jnp.argmax(probs / noise, axis=-1).astype(jnp.int32)

    return jax.lax.cond(mode == GREEDY, greedy, sample, x)


# ---- compiled pieces ----------------------------------------------------------------------------------
@partial(jax.jit, static_argnums=(0, 3))
def _prefill_last(cfg: ModelConfig, params: dict, tokens: jax.Array, max_len: int):
    """tokens [B,S] -> (logits of the last position [B,V] f32, cache)."""
    logits, cache = model.prefill(cfg, params, tokens, max_len)
    return logits[:, -1], cache


@partial(jax.jit, static_argnums=(0, 1, 2))
def _empty_cache(cfg: ModelConfig, batch: int, max_len: int):
    return model.init_cache(cfg, batch, max_len)


@jax.jit
def _stack(logits_parts, cache_parts, perm):
    """Concatenate per-group logits / caches along the batch axis and put the rows back in prompt order."""
    logits = jnp.concatenate(logits_parts, axis=0)[perm]
    cache = jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0)[perm], *cache_parts)
    return logits, cache


@jax.jit
def _sample_first(logits, key, mode, temperature, top_p, top_k, vocab_limit):
    return sample_logits(logits, key, 0, mode=mode, temperature=temperature, top_p=top_p, top_k=top_k,
                         vocab_limit=vocab_limit)


@partial(jax.jit, static_argnums=(0,), donate_argnums=(2,))
def _decode_chunk(cfg: ModelConfig, params: dict, cache: dict, token, done, count, forced, n_forced, budget, key,
                  mode, temperature, top_p, top_k, vocab_limit, eos_id):
    """Up to `chunk` = forced.shape[1] decode steps on device; stops early once every sequence is done.

    token [B]: fed first; done [B] bool; count [B]: tokens sampled so far; forced [B, chunk] with n_forced [B]:
    the next prompt tokens of each sequence (fed before sampling starts); budget: tokens to sample per sequence.
    Returns (cache, last token [B], done, count, out [B, chunk] (EOS where nothing was taken), steps run)."""
    B, chunk = forced.shape
    out0 = jnp.full((B, chunk), eos_id, jnp.int32)

    def cond(c):
        i, _, _, done, _, _ = c
        return (i < chunk) & ~jnp.all(done)

    def body(c):
        i, cache, tok, done, count, out = c
        logits, cache = _decode_body(cfg, params, cache, tok)
        cache = dict(cache, pos=jnp.where(done, cache["pos"] - 1, cache["pos"]))   # dead sequences stay put
        sampled = sample_logits(logits, key, count, mode=mode, temperature=temperature, top_p=top_p, top_k=top_k,
                                vocab_limit=vocab_limit)
        is_forced = i < n_forced
        live = ~is_forced & ~done                       # this step samples a real token
        nxt = jnp.where(is_forced, jax.lax.dynamic_slice_in_dim(forced, i, 1, axis=1)[:, 0],
                        jnp.where(done, eos_id, sampled))
        count = count + live
        done = done | (live & (sampled == eos_id)) | (count >= budget)
        out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, i))
        return i + 1, cache, nxt, done, count, out

    i, cache, tok, done, count, out = jax.lax.while_loop(
        cond, body, (jnp.int32(0), cache, token.astype(jnp.int32), done, count, out0))
    return cache, tok, done, count, out, i


# ---- results ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class GenerationStats:
    """Timing of one `generate` call (shared by all its results). Times in seconds, wall clock."""
    batch: int = 0
    prompt_tokens: int = 0          # all prompts together
    prefill_tokens: int = 0         # of those, the ones run by prefill (the rest went through the decode loop)
    generated_tokens: int = 0       # sampled tokens of all sequences, EOS included, masked steps excluded
    decode_tokens: int = 0          # tokens the decode loop ran for live sequences (forced prompt tokens too)
    decode_steps: int = 0           # batch steps of the decode loop
    prefill_s: float = 0.0
    decode_s: float = 0.0
    compile_s: float = 0.0          # ahead-of-time compilation (0 when every shape was seen before)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefill_tokens / self.prefill_s if self.prefill_s > 0 and self.prefill_tokens else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens through the decode loop (all live sequences) per second of decode time."""
        return self.decode_tokens / self.decode_s if self.decode_s > 0 and self.decode_tokens else float("nan")

    def summary(self) -> str:
        return (f"prefill {self.prefill_tokens} tok in {self.prefill_s:.2f}s ({self.prefill_tokens_per_s:.1f} tok/s),"
                f" decode {self.decode_tokens} tok in {self.decode_s:.2f}s ({self.decode_tokens_per_s:.1f} tok/s,"
                f" batch {self.batch}), {self.generated_tokens} generated, compile {self.compile_s:.1f}s")


@dataclasses.dataclass
class GenerationResult:
    """One sequence's output.

    text: the decoded generated text (stop string and EOS excluded); tokens: the generated ids (EOS excluded;
    with a stop string, up to the token that completed it); finish_reason: "eos" | "stop" | "length";
    prompt_tokens: the prompt's length; stats: timing of the whole call; message: for `Generator.chat`, the
    parsed reply {"reasoning_content", "content", "tool_calls"}."""
    text: str
    tokens: list[int]
    finish_reason: str
    prompt_tokens: int
    stats: GenerationStats
    message: dict | None = None

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.stats.prefill_tokens_per_s

    @property
    def decode_tokens_per_s(self) -> float:
        return self.stats.decode_tokens_per_s


# ---- host-side helpers --------------------------------------------------------------------------------
_EXECUTABLES: dict = {}


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Characters at the end of `text` not safe to stream yet: an incomplete UTF-8 character (the decoder shows
    U+FFFD) or a proper prefix of a stop string."""
    n = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), n, -1):
            if text.endswith(s[:k]):
                n = k
                break
    if text.endswith("\ufffd"):
        n = max(n, len(text) - len(text.rstrip("\ufffd")))
    return n


def _next_bucket(n: int) -> int:
    return max(256, 1 << (max(n, 1) - 1).bit_length())


class _Seq:
    """Host-side state of one sequence."""

    def __init__(self, prompt: list[int], prefilled: int):
        self.prompt_len = len(prompt)
        self.pending = list(prompt[prefilled:])   # prompt tokens still to feed through the decode loop
        self.tokens: list[int] = []
        self.finish: str | None = None
        self.text = ""
        self.emitted = 0                          # characters of text already streamed


class Generator:
    """Sampling on top of prefill / decode_step; see the module docstring.

    max_len: the longest sequence (prompt + generated) a call may produce. It is also the cache length, so a
      fixed value means one compiled decode loop per batch size. None: the cache is sized per call (a power
      of two >= 256 covering the longest prompt + max_new_tokens) and sequences may reach
      cfg.max_position_embeddings.
    chunk: decode steps per on-device loop (the streaming granularity).
    prefill_chunk: None = prefill each prompt whole (one compile per prompt length); n = prefill up to the
      last multiple of n and feed the rest through the decode loop (one compile per multiple of n)."""

    def __init__(self, cfg: ModelConfig, params: dict, tokenizer, max_len: int | None = None, *, chunk: int = 16,
                 prefill_chunk: int | None = None):
        if max_len is not None and max_len > cfg.max_position_embeddings:
            raise ValueError(f"max_len={max_len} exceeds the model's max_position_embeddings="
                             f"{cfg.max_position_embeddings}")
        if max_len is not None and max_len < 2:
            raise ValueError(f"max_len must be >= 2, got {max_len}")
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1 or None, got {prefill_chunk}")
        self.cfg, self.params, self.tokenizer = cfg, params, tokenizer
        self.max_len, self.chunk, self.prefill_chunk = max_len, int(chunk), prefill_chunk
        self.eos_id = int(tokenizer.eos_id)
        self.vocab_limit = min(int(tokenizer.vocab_size), cfg.vocab_size)
        if not 0 <= self.eos_id < cfg.vocab_size:
            raise ValueError(f"tokenizer EOS id {self.eos_id} is outside the model vocab ({cfg.vocab_size})")
        # what a compiled executable depends on besides the call's shapes: the config and the params' layout
        leaves, tree = jax.tree.flatten(params)
        self._sig = (cfg, tree, tuple((x.shape, str(x.dtype), getattr(x, "sharding", None)) for x in leaves))

    # ---- compiled executables, cached per shape ----
    def _exe(self, name: str, jitted, key, stats: GenerationStats, *args):
        k = (name, self._sig, key)
        exe = _EXECUTABLES.get(k)
        if exe is None:
            t = time.perf_counter()
            exe = jitted.lower(*args).compile()
            stats.compile_s += time.perf_counter() - t
            if len(_EXECUTABLES) >= 64:
                _EXECUTABLES.pop(next(iter(_EXECUTABLES)))
            _EXECUTABLES[k] = exe
        return exe

    # ---- prompts ----
    def _prompt_ids(self, prompts, add_bos: bool) -> list[list[int]]:
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
            raise TypeError("prompts must be a list of strings or a list of token-id lists")
        if len(prompts) == 0:
            raise ValueError("prompts is empty")
        out = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                ids = self.tokenizer.encode(p)
                if add_bos and not p.startswith(self.tokenizer.bos_token):
                    ids = [self.tokenizer.bos_id, *ids]
            else:
                ids = [int(t) for t in np.asarray(p).reshape(-1)]
                bad = [t for t in ids if not 0 <= t < self.cfg.vocab_size]
                if bad:
                    raise ValueError(f"prompt {i} has token id {bad[0]} outside the model vocab "
                                     f"[0, {self.cfg.vocab_size})")
            if not ids:
                raise ValueError(f"prompt {i} is empty (no tokens)")
            out.append(ids)
        return out

    def _cache_len(self, ids: list[list[int]], max_new_tokens: int) -> int:
        limit = self.max_len if self.max_len is not None else self.cfg.max_position_embeddings
        what = "max_len" if self.max_len is not None else "max_position_embeddings"
        for i, p in enumerate(ids):
            if len(p) + max_new_tokens > limit:
                raise ValueError(f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} that is "
                                 f"{len(p) + max_new_tokens} tokens, more than {what}={limit}")
        if self.max_len is not None:
            return self.max_len
        return min(_next_bucket(max(len(p) for p in ids) + max_new_tokens), limit)

    def _prefilled(self, n: int) -> int:
        return n if self.prefill_chunk is None else n - n % self.prefill_chunk

    # ---- the loop ----
    def generate(self, prompts: Sequence[str] | Sequence[Sequence[int]], *, max_new_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, greedy: bool = False, seed: int = 0,
                 stop: Sequence[str] | str = (), stream: Callable[[int, str], Any] | None = None,
                 add_bos: bool = True) -> list[GenerationResult]:
        """Generate a continuation of every prompt (a batch; lengths may differ).

        prompts: strings (tokenized; BOS prepended unless add_bos=False or the text starts with BOS) or token-id
          lists (used as given).
        max_new_tokens: tokens to sample per sequence at most (EOS included).
        temperature / top_p / top_k / greedy: sampling; temperature <= 0 means greedy. The defaults are the
          official generation_config.json (T 1.0, top_p 1.0); the reference script samples at T 0.6.
        seed: PRNG seed (the same seed and inputs give the same output).
        stop: strings that end a sequence; its text is cut before the stop string.
        stream: called as stream(index, new_text) with each piece of text as soon as it is final (between chunks).
        Returns one GenerationResult per prompt, in order."""
        max_new_tokens = int(max_new_tokens)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        stops = [stop] if isinstance(stop, str) else list(stop)
        if any(not isinstance(s, str) or not s for s in stops):
            raise ValueError(f"stop strings must be non-empty strings, got {stops!r}")
        greedy = greedy or temperature <= 0

        ids = self._prompt_ids(prompts, add_bos)
        cache_len = self._cache_len(ids, max_new_tokens)
        B = len(ids)
        seqs = [_Seq(p, self._prefilled(len(p))) for p in ids]
        stats = GenerationStats(batch=B, prompt_tokens=sum(len(p) for p in ids),
                                prefill_tokens=sum(s.prompt_len - len(s.pending) for s in seqs))

        # sampling parameters as device scalars: changing them does not recompile
        key = jax.random.PRNGKey(int(seed))
        mode = jnp.int32(GREEDY if greedy else (FILTERED if (top_k > 0 or top_p < 1.0) else SAMPLE))
        samp = (mode, jnp.float32(max(temperature, 0.0)), jnp.float32(top_p), jnp.int32(top_k),
                jnp.int32(self.vocab_limit))
        eos = jnp.int32(self.eos_id)

        # ---- prefill: one call per distinct prefilled length (0: an empty cache), stacked along the batch ----
        t0 = time.perf_counter()
        groups: dict[int, list[int]] = {}
        for b, s in enumerate(seqs):
            groups.setdefault(s.prompt_len - len(s.pending), []).append(b)
        order, logits_parts, cache_parts = [], [], []
        for S, members in groups.items():
            if S == 0:
                exe = self._exe("empty", _empty_cache, (len(members), cache_len), stats,
                                self.cfg, len(members), cache_len)
                c = exe()
                lg = jnp.zeros((len(members), self.cfg.vocab_size), jnp.float32)
            else:
                toks = jnp.asarray([ids[b][:S] for b in members], jnp.int32)
                exe = self._exe("prefill", _prefill_last, (toks.shape, cache_len), stats,
                                self.cfg, self.params, toks, cache_len)
                lg, c = exe(self.params, toks)
            jax.block_until_ready(lg)
            order += members
            logits_parts.append(lg)
            cache_parts.append(c)
        if len(cache_parts) == 1:
            logits, cache = logits_parts[0], cache_parts[0]
        else:
            perm = jnp.asarray(np.argsort(order), jnp.int32)
            exe = self._exe("stack", _stack, (tuple(len(groups[S]) for S in groups), cache_len), stats,
                            logits_parts, cache_parts, perm)
            logits, cache = exe(logits_parts, cache_parts, perm)
        del logits_parts, cache_parts

        # first token: sampled from the prefill logits, or the next prompt token where some are still pending
        exe = self._exe("first", _sample_first, (logits.shape,), stats, logits, key, *samp)
        first = np.asarray(jax.device_get(exe(logits, key, *samp)))
        stats.prefill_s = time.perf_counter() - t0 - stats.compile_s     # compile time is reported apart
        has_first = np.array([not s.pending for s in seqs])
        tok = np.asarray([s.pending.pop(0) if s.pending else first[b] for b, s in enumerate(seqs)], np.int32)
        stats.generated_tokens += self._absorb(seqs, [[int(first[b])] if has_first[b] else [] for b in range(B)],
                                               stops, stream, max_new_tokens)
        count = has_first.astype(np.int32)

        # ---- decode in on-device chunks ----
        tok_dev = jnp.asarray(tok)
        chunk = self.chunk
        while not all(s.finish is not None for s in seqs):
            forced = np.full((B, chunk), self.eos_id, np.int32)
            n_forced = np.zeros((B,), np.int32)
            for b, s in enumerate(seqs):
                k = min(chunk, len(s.pending))
                forced[b, :k], n_forced[b] = s.pending[:k], k
            done = np.array([s.finish is not None for s in seqs])
            args = (self.params, cache, tok_dev, jnp.asarray(done), jnp.asarray(count), jnp.asarray(forced),
                    jnp.asarray(n_forced), jnp.int32(max_new_tokens), key, *samp, eos)
            exe = self._exe("decode", _decode_chunk, (B, cache_len, chunk), stats, self.cfg, *args)
            t = time.perf_counter()
            cache, tok_dev, _, count_dev, out, steps = exe(*args)
            out, count_new, steps = jax.device_get((out, count_dev, steps))
            stats.decode_s += time.perf_counter() - t
            steps = int(steps)
            stats.decode_steps += steps
            new = []
            for b, s in enumerate(seqs):
                nf = min(int(n_forced[b]), steps)
                del s.pending[:nf]
                took = int(count_new[b]) - int(count[b])
                stats.decode_tokens += (nf + took) if not done[b] else 0
                new.append([int(t) for t in out[b, nf:nf + took]] if not done[b] else [])
            count = np.asarray(count_new, np.int32)
            stats.generated_tokens += self._absorb(seqs, new, stops, stream, max_new_tokens)
            if steps == 0:      # only when every sequence was already done; never spin
                break
        del cache

        return [GenerationResult(text=s.text, tokens=s.tokens, finish_reason=s.finish or FINISH_LENGTH,
                                 prompt_tokens=s.prompt_len, stats=stats) for s in seqs]

    def _absorb(self, seqs: list[_Seq], new: list[list[int]], stops, stream, max_new: int) -> int:
        """Take newly sampled tokens into the host state: EOS, stop strings, length budget, streaming.
        Returns how many tokens were taken."""
        taken = 0
        for b, (s, toks) in enumerate(zip(seqs, new)):
            if s.finish is not None or not toks:
                continue
            start = len(s.tokens)
            for t in toks:
                taken += 1
                if t == self.eos_id:
                    s.finish = FINISH_EOS
                    break
                s.tokens.append(t)
            text = self.tokenizer.decode(s.tokens)
            if stops:
                hits = [(i, x) for x in stops if (i := text.find(x)) >= 0]
                if hits:
                    cut, x = min(hits, key=lambda h: (h[0], len(h[1])))
                    text = text[:cut]
                    s.finish = FINISH_STOP
                    for k in range(start + 1, len(s.tokens) + 1):   # keep up to the token completing the stop
                        if x in self.tokenizer.decode(s.tokens[:k]):
                            del s.tokens[k:]
                            break
            if s.finish is None and start + len(toks) >= max_new:
                s.finish = FINISH_LENGTH
            s.text = text
            upto = len(text) if s.finish is not None else len(text) - _held_back(text, stops)
            if stream is not None and upto > s.emitted:
                stream(b, text[s.emitted:upto])
            s.emitted = max(s.emitted, upto)
        return taken

    # ---- chat ----
    def chat(self, messages: Sequence[Mapping[str, Any]] | Sequence[Sequence[Mapping[str, Any]]], *,
             thinking: Any = "none", tools: Sequence[Mapping[str, Any]] | None = None, max_new_tokens: int = 512,
             **sampling) -> GenerationResult | list[GenerationResult]:
        """Reply to one conversation (a list of message dicts) or to a batch of them (a list of lists).

        The prompt is chat.encode_messages(messages, thinking=..., tools=...); the reply text is parsed with
        chat.parse_completion into result.message = {"reasoning_content", "content", "tool_calls"}
        (chat.completion_to_message(result.message) is the assistant message to append for the next turn).
        sampling: any keyword of `generate` (temperature, top_p, top_k, greedy, seed, stop, stream)."""
        batched = len(messages) > 0 and not isinstance(messages[0], Mapping)
        convs = list(messages) if batched else [messages]
        mode = chat_format.normalize_thinking(thinking)
        prompts = [chat_format.encode_messages(c, thinking=mode, tools=tools) for c in convs]
        results = self.generate(prompts, max_new_tokens=max_new_tokens, add_bos=False, **sampling)
        for r in results:
            r.message = chat_format.parse_completion(r.text, thinking=mode != "none")
        return results if batched else results[0]

"""Generator: on-device chunked decode, in-graph sampling, EOS / stop / length, batches of mixed lengths.

One module-scoped tiny model (quantisation simulations off, fp32 activations: decode equals forward to
rounding) and a fixed cache length. The shared generator prefills in multiples of 27 tokens, so the 27-token
prompt goes through prefill and the 6-token one starts from an empty cache and is fed through the decode loop:
the whole file compiles one prefill shape, two decode batch sizes and one forward."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import v4jax
from v4jax import chat
from v4jax.generate import GREEDY, FILTERED, Generator, sample_logits
from v4jax.tokenizer import build_byte_tokenizer

MAX_LEN, CHUNK, NEW, PREFILL = 64, 8, 12, 27
CONV = [{"role": "user", "content": "hi"}]
TEXT = "Hello, world! How are you?"


@pytest.fixture(scope="module")
def model():
    tok = build_byte_tokenizer()
    cfg = v4jax.ModelConfig.preset("tiny", quant_sim=False, compute_dtype="float32")
    assert cfg.vocab_size >= tok.vocab_size
    params = v4jax.init_params(cfg, jax.random.PRNGKey(0))
    return cfg, params, tok


@pytest.fixture(scope="module")
def gen(model):
    cfg, params, tok = model
    return Generator(cfg, params, tok, max_len=MAX_LEN, chunk=CHUNK, prefill_chunk=PREFILL)


@pytest.fixture(scope="module")
def prompts(model):
    tok = model[2]
    p1 = tok.encode(chat.encode_messages(CONV))            # chat prompt ids (BOS as text), 6 tokens
    p2 = [tok.bos_id] + tok.encode(TEXT)                    # what generate() makes of TEXT, 27 tokens
    assert len(p1) != len(p2)
    return p1, p2


@pytest.fixture(scope="module")
def greedy(gen, prompts):
    """A batch of two prompts of different lengths, greedy; one given as ids, one as text."""
    pieces = {0: [], 1: []}
    res = gen.generate([prompts[0], TEXT], max_new_tokens=NEW, greedy=True,
                       stream=lambda i, s: pieces[i].append(s))
    return res, pieces


def test_greedy_equals_teacher_forced_argmax(model, prompts, greedy):
    cfg, params, tok = model
    res, pieces = greedy
    seqs = [p + r.tokens for p, r in zip(prompts, res)]
    L = max(len(s) for s in seqs)
    batch = jnp.asarray([s + [0] * (L - len(s)) for s in seqs], jnp.int32)   # causal: end padding is harmless
    logits = np.asarray(v4jax.forward(cfg, params, batch))[..., :tok.vocab_size]
    for b, (p, r) in enumerate(zip(prompts, res)):
        assert r.finish_reason == "length" and len(r.tokens) == NEW
        assert r.prompt_tokens == len(p)
        want = logits[b, len(p) - 1: len(p) - 1 + NEW].argmax(-1)
        assert r.tokens == want.tolist(), b
        assert r.text == tok.decode(r.tokens)
        assert "".join(pieces[b]) == r.text                    # streamed pieces add up to the text
    st = res[0].stats
    assert st.batch == 2 and st.prompt_tokens == sum(map(len, prompts)) and st.generated_tokens == 2 * NEW
    assert st.prefill_tokens == len(prompts[1])
    # prompt 1's first token comes from prefill; prompt 0 feeds 5 more prompt tokens, then samples NEW
    assert st.decode_steps == len(prompts[0]) - 1 + NEW
    assert st.decode_tokens == (NEW - 1) + (len(prompts[0]) - 1 + NEW)
    assert st.prefill_tokens_per_s > 0 and st.decode_tokens_per_s > 0
    assert res[0].decode_tokens_per_s == st.decode_tokens_per_s


def test_mixed_length_batch_equals_each_alone(gen, prompts, greedy):
    res, _ = greedy
    for p, r in zip(prompts, res):
        [alone] = gen.generate([p], max_new_tokens=NEW, greedy=True)
        assert alone.tokens == r.tokens


def test_prompt_through_decode_loop_equals_prefill(model, prompts, greedy):
    """prefill_chunk=32: both prompts start from an empty cache (the 27-token one is fed through the decode loop
    across four chunks) and give what prefill gave."""
    cfg, params, tok = model
    res, _ = greedy
    gen = Generator(cfg, params, tok, max_len=MAX_LEN, chunk=CHUNK, prefill_chunk=32)
    out = gen.generate([prompts[0], TEXT], max_new_tokens=NEW, greedy=True)
    assert [r.tokens for r in out] == [r.tokens for r in res]
    st = out[0].stats
    assert st.prefill_tokens == 0 and st.generated_tokens == 2 * NEW
    assert st.decode_steps == len(prompts[1]) - 1 + NEW


def test_seed_reproducible_and_filters(gen, prompts, greedy):
    p = prompts[0]
    a = gen.generate([p], max_new_tokens=NEW, temperature=1.0, seed=0)[0].tokens
    b = gen.generate([p], max_new_tokens=NEW, temperature=1.0, seed=0)[0].tokens
    c = gen.generate([p], max_new_tokens=NEW, temperature=1.0, seed=1)[0].tokens
    assert a == b
    assert a != c
    assert a != greedy[0][0].tokens
    # top-k 1 and a tiny nucleus are greedy decoding, whatever the seed and temperature
    g = greedy[0][0].tokens
    assert gen.generate([p], max_new_tokens=NEW, temperature=2.0, top_k=1, seed=5)[0].tokens == g
    assert gen.generate([p], max_new_tokens=NEW, temperature=2.0, top_p=1e-6, seed=6)[0].tokens == g
    assert gen.generate([p], max_new_tokens=NEW, temperature=0.0, seed=7)[0].tokens == g


class _EosAt:
    """The byte tokenizer, with EOS moved to a chosen id (forces the real model to emit 'EOS')."""

    def __init__(self, tok, eos_id):
        self._tok, self.eos_id = tok, eos_id

    def __getattr__(self, name):
        return getattr(self._tok, name)


def test_eos_stops_and_is_masked(model, prompts, greedy):
    cfg, params, tok = model
    res, _ = greedy
    g0, g1 = res[0].tokens, res[1].tokens
    k = next(i for i in range(2, NEW) if g0[i] not in g0[:i])   # first token id that is new at step >= 2
    eos = g0[k]
    gen = Generator(cfg, params, _EosAt(tok, eos), max_len=MAX_LEN, chunk=CHUNK, prefill_chunk=PREFILL)
    r0, r1 = gen.generate([prompts[0], TEXT], max_new_tokens=NEW, greedy=True)
    assert r0.finish_reason == "eos" and r0.tokens == g0[:k]
    # the other sequence runs on, unaffected by its neighbour having finished
    want1 = g1[:g1.index(eos)] if eos in g1 else g1
    assert r1.tokens == want1
    assert r1.finish_reason == ("eos" if eos in g1 else "length")
    # alone, the loop stops on device as soon as every sequence is done
    [r] = gen.generate([prompts[0]], max_new_tokens=NEW, greedy=True)
    assert r.tokens == g0[:k] and r.finish_reason == "eos"
    # 5 more prompt tokens, then k tokens and EOS: the loop ran exactly that many steps
    assert r.stats.decode_steps == len(prompts[0]) - 1 + k + 1 and r.stats.generated_tokens == k + 1


def test_stop_strings_truncate(gen, greedy, model):
    tok = model[2]
    full = greedy[0][1]
    t = full.text
    m = next(i for i in range(len(t) // 3, len(t) - 2) if "\ufffd" not in t[i:i + 2])
    stop = t[m:m + 2]
    cut = t.find(stop)
    pieces = []
    [r] = gen.generate([TEXT], max_new_tokens=NEW, greedy=True, stop=["never-there", stop],
                       stream=lambda i, s: pieces.append(s))
    assert r.finish_reason == "stop"
    assert r.text == t[:cut]
    assert "".join(pieces) == r.text
    n = len(r.tokens)
    assert r.tokens == full.tokens[:n]
    assert stop in tok.decode(r.tokens) and stop not in tok.decode(r.tokens[:-1])


def test_chat_parses_reply(gen, greedy):
    r = gen.chat(CONV, thinking="none", max_new_tokens=NEW, greedy=True)
    assert r.tokens == greedy[0][0].tokens                      # same prompt as the ids of prompts[0]
    assert r.message == chat.parse_completion(r.text, thinking=False)
    assert set(r.message) == {"reasoning_content", "content", "tool_calls"}


def test_too_long_prompt_is_refused_with_the_numbers(model, gen):
    cfg, params, tok = model
    with pytest.raises(ValueError, match=r"27 tokens.*max_new_tokens=40.*67.*max_len=64"):
        gen.generate([TEXT], max_new_tokens=40)
    unbounded = Generator(cfg, params, tok)
    with pytest.raises(ValueError, match=r"4090 tokens.*4100.*max_position_embeddings=4096"):
        unbounded.generate([[5] * 4090], max_new_tokens=10)
    with pytest.raises(ValueError, match="max_len=5000.*4096"):
        Generator(cfg, params, tok, max_len=5000)
    with pytest.raises(ValueError, match="outside the model vocab"):
        gen.generate([[1, cfg.vocab_size]], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        gen.generate([TEXT], max_new_tokens=0)


def test_sample_logits_filters():
    V = 8
    logits = jnp.log(jnp.asarray([0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.01, 0.01]))
    x = jnp.tile(logits, (512, 1))                              # 512 rows = 512 independent draws
    key = jax.random.PRNGKey(0)
    f = jax.jit(lambda mode, T, p, k, lim: sample_logits(x, key, 3, mode=mode, temperature=T, top_p=p, top_k=k,
                                                         vocab_limit=lim))
    top3 = np.asarray(f(FILTERED, 1.0, 1.0, 3, V))
    assert set(top3.tolist()) == {0, 1, 2}
    nucleus = np.asarray(f(FILTERED, 1.0, 0.6, 0, V))           # 0.4 + 0.25 reaches 0.6
    assert set(nucleus.tolist()) == {0, 1}
    limited = np.asarray(f(1, 1.0, 1.0, 0, 2))                   # ids >= 2 unusable
    assert set(limited.tolist()) == {0, 1}
    freq = np.bincount(np.asarray(f(1, 1.0, 1.0, 0, V)), minlength=V) / 512
    assert abs(freq[0] - 0.4) < 0.08 and abs(freq[1] - 0.25) < 0.08   # Exp(1) trick samples softmax(logits)
    assert np.asarray(f(GREEDY, 1.0, 1.0, 0, V)).tolist() == [0] * 512

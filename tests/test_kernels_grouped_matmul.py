"""Grouped matmul (pallas_kernels.grouped_matmul): the Pallas GPU kernels in interpret mode == the ragged_dot reference
(forward, dx) and a float64 computation (the weight gradient, dw).

CPU only: the Triton kernel runs with interpret=True on tiny shapes and small tiles (16 rows x 16/32 columns),
and is lowered for cuda to catch Pallas->Triton lowering errors without the hardware.
"""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from pallas_kernels import grouped_matmul as gm
from pallas_kernels.grouped_matmul import capacity, gpu, reference
from v4jax import quant

SMALL = dict(block_m=16, block_n=16, block_k=32, interpret=True)


def _inputs(N, K, O, sizes, seed=0, fmt="bf16"):
    rng = np.random.default_rng(seed)
    E = len(sizes)
    x = jnp.asarray(rng.standard_normal((N, K), np.float32)).astype(jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((E, O, K), np.float32) * 0.1)
    if fmt == "fp8":
        node = dict(zip(("weight", "scale"), quant.quantize_fp8_weight(w)))
    elif fmt == "fp4":
        node = dict(zip(("weight", "scale"), quant.quantize_fp4_weight(w)))
    else:
        node = {"weight": w.astype(jnp.bfloat16)}
    return x, node, jnp.asarray(sizes, jnp.int32)


def _ref(x, node, gs):
    return reference.grouped_matmul(x, gm.dequantize(node["weight"], node.get("scale"), jnp.bfloat16), gs)


def _check(out, ref, sizes, N):
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert out.shape == ref.shape and np.isfinite(out).all()
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * max(np.abs(ref).max(), 1e-30))
    assert not out[int(np.sum(sizes)):].any()                             # rows past the groups are exactly 0


# N, K, O, group sizes: empty groups (first, middle, last), all rows in one group, N not a multiple of the tile,
# rows past the groups, O not a multiple of the column tile, more groups than row tiles
CASES = [(70, 64, 48, [10, 0, 25, 3, 20]), (37, 32, 32, [0, 37, 0]), (53, 64, 40, [5, 9, 0, 30]),
         (20, 32, 16, [1] * 12 + [0] * 4)]


@pytest.mark.parametrize("case", CASES)
def test_gpu_kernel_bf16_matches_reference(case):
    N, K, O, sizes = case
    x, node, gs = _inputs(N, K, O, sizes, seed=N)
    out = gpu.grouped_matmul(x, node["weight"], gs, **SMALL)
    _check(out, _ref(x, node, gs), sizes, N)


def test_gpu_kernel_random_group_sizes_and_tiles():
    rng = np.random.default_rng(1)
    N, K, O, E = 90, 64, 64, 7
    sizes = rng.multinomial(N - 11, np.ones(E) / E)
    sizes[[0, 4]] = 0
    sizes[1] += 0
    x, node, gs = _inputs(N, K, O, sizes, seed=2)
    ref = _ref(x, node, gs)
    for kw in (dict(block_m=32, block_n=32, block_k=64), dict(block_m=16, block_n=64, block_k=16, w_lhs=True)):
        _check(gpu.grouped_matmul(x, node["weight"], gs, interpret=True, **kw), ref, sizes, N)


@pytest.mark.parametrize("fmt,w_lhs", [("fp8", False), ("fp4", True)])
def test_gpu_kernel_quantised_weights(fmt, w_lhs):
    N, K, O, sizes = 45, 256, 144, [12, 0, 20, 6]                        # K: two FP8 blocks; O: a partial block
    x, node, gs = _inputs(N, K, O, sizes, seed=3, fmt=fmt)
    out = gpu.grouped_matmul(x, node["weight"], gs, node["scale"], block_m=16, block_n=32, block_k=64,
                             w_lhs=w_lhs, interpret=True)
    _check(out, _ref(x, node, gs), sizes, N)


@pytest.mark.parametrize("fmt", ["bf16", "fp8", "fp4"])
def test_gpu_kernel_decode_launch(fmt):
    """Decode: a few rows spread over many experts (N < 16 E) takes DECODE_DEFAULTS (16-row tiles, the weight as
    the dot's left operand, 128-wide K steps), the launch the model's decode runs."""
    N, K, O = 7, 256, 256
    sizes = [0] * 20
    for e in (1, 5, 5, 9, 19, 19, 19):
        sizes[e] += 1
    assert N < gpu.DECODE_ROWS_PER_GROUP * len(sizes)
    x, node, gs = _inputs(N, K, O, sizes, seed=11, fmt=fmt)
    out = gpu.grouped_matmul(x, node["weight"], gs, node.get("scale"), interpret=True)
    _check(out, _ref(x, node, gs), sizes, N)


# FP4 decode variants (opt-in launch options): (fp4_decode, fp4_parity, w_lhs both ways in both cases); True =
# "split". The extra variants (integer-only scale, the other two ways to read x's even/odd columns) run w_lhs
# True in the decode case and False in the many-rows case (test time).
FP4_VARIANTS = [("e4m3", False, True), ("e4m3", True, True), ("bits", False, True), ("bits", True, True),
                ("bits_exp", False, False), ("bits_exp", True, False), ("e4m3", "strided", False),
                ("bits", "permuted", False)]


@pytest.mark.parametrize("decode,parity,both", FP4_VARIANTS)
def test_gpu_kernel_fp4_decode_variants(decode, parity, both):
    """FP4 decode variants == the reference: at decode (a few rows over many experts: the DECODE_DEFAULTS launch,
    16-row tiles, 128-wide K steps) and with many rows per group (DEFAULTS["fp4"]: 128-row tiles, 64-wide K)."""
    few = [0] * 20
    for e in (1, 5, 5, 9, 19, 19, 19):
        few[e] += 1
    for N, K, O, sizes in ((7, 256, 256, few), (300, 256, 192, [120, 0, 150])):    # 30 rows past the groups
        x, node, gs = _inputs(N, K, O, sizes, seed=N + 1, fmt="fp4")
        ref = _ref(x, node, gs)
        for w_lhs in (True, False) if both else (N < 16 * len(sizes),):
            out = gpu.grouped_matmul(x, node["weight"], gs, node["scale"], w_lhs=w_lhs, fp4_decode=decode,
                                     fp4_parity=parity, interpret=True)
            _check(out, ref, sizes, N)


def test_fp4_decode_tile_bits_equal_e4m3():
    """The tile decode alone: every byte (all 16 x 16 nibble pairs) x every E8M0 code. "bits" == "e4m3" bit for bit
    everywhere (0, 255 and the 64 * scale overflow of 249-254 included); "bits_exp" == "e4m3" for codes 2..248 and
    == the exact value value * 2^(code-127) for 2..252 (the documented range)."""
    b = jnp.tile(jnp.arange(-128, 128, dtype=jnp.int32)[None], (256, 1))          # row c: all 256 bytes
    codes = jnp.broadcast_to(jnp.arange(256, dtype=jnp.int32)[:, None], (256, 16))  # row c: scale code c
    tile = jax.jit(gpu.fp4_decode_tile, static_argnums=2)
    dec = {d: [np.asarray(t).view(np.uint16) for t in tile(b, codes, d)] for d in gpu.TILE_DECODES}
    nib = np.arange(-128, 128) & 255
    exact = [np.asarray(quant.fp4_unpack(jnp.asarray(nib.astype(np.int8))))[h::2] for h in (0, 1)]  # lo, hi values
    for h in (0, 1):
        np.testing.assert_array_equal(dec["bits"][h], dec["e4m3"][h])
        np.testing.assert_array_equal(dec["bits_exp"][h][2:249], dec["e4m3"][h][2:249])
        c = np.arange(2, 253)
        want = (exact[h][None, :] * np.exp2(c - 127.0)[:, None]).astype(np.float32)
        np.testing.assert_array_equal(dec["bits_exp"][h][2:253],
                                      np.asarray(jnp.asarray(want).astype(jnp.bfloat16)).view(np.uint16))
    lo = np.asarray(dec["e4m3"][0]).view(jnp.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(lo[127, :16], [0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6])
    assert np.signbit(lo[127, 8]) and not lo[0].any() and np.isinf(lo[255, 1])


def test_gpu_kernel_fp4_decodes_bit_identical():
    """Through the kernel: a weight holding every byte value (every nibble, low and high) with scale codes from tiny
    to huge, x = the identity, so out = w^T exactly: the decodes (with parity variants) give the same bits,
    == dequantise."""
    K, O = 64, 256
    byte = (np.arange(O * K // 2).reshape(1, O, K // 2) % 256 - 128).astype(np.int8)
    cl = np.array([2, 3, 60, 100, 120, 126, 127, 128, 134, 200, 247, 248], np.uint8)
    codes = cl[np.arange(O * K // 32).reshape(1, O, K // 32) % len(cl)]
    w = jnp.asarray(byte)
    s = jax.lax.bitcast_convert_type(jnp.asarray(codes), jnp.float8_e8m0fnu)
    x = jnp.eye(K, dtype=jnp.bfloat16)
    gs = jnp.asarray([K], jnp.int32)
    want = np.asarray(gm.dequantize(w, s, jnp.float32))[0].T                   # [K, O]
    assert np.isfinite(want).all() and np.abs(want).max() > 1e37 and 0 < np.abs(want[want != 0]).min() < 1e-37
    first = None
    for decode, parity, w_lhs in (("e4m3", False, False), ("bits", True, True), ("bits_exp", "permuted", False)):
        out = np.asarray(gpu.grouped_matmul(x, w, gs, s, fp4_decode=decode, fp4_parity=parity, w_lhs=w_lhs,
                                            block_m=16, block_n=64, block_k=32, interpret=True))
        np.testing.assert_array_equal(out, want)                              # (-0 weights sum to +0 here)
        first = out if first is None else first
        np.testing.assert_array_equal(out.view(np.uint32), first.view(np.uint32))


def test_gpu_kernel_fp4_option_values():
    x, node, gs = _inputs(8, 64, 32, [3, 5], fmt="fp4")
    for bad in (dict(fp4_decode="e2m1"), dict(fp4_parity="odd"), dict(fp4_parity=2)):
        with pytest.raises(ValueError, match="fp4_"):
            gpu.grouped_matmul(x, node["weight"], gs, node["scale"], interpret=True, **bad)


def test_gpu_kernel_transposed_weight_and_bf16_output():
    N, K, O, sizes = 40, 48, 32, [7, 0, 25]                              # w used as [E, in=48, out=32]
    x, node, gs = _inputs(N, O, K, sizes, seed=4)
    w = node["weight"]                                                    # [E, 48(out of w) = in, 32]
    xin = jnp.asarray(np.random.default_rng(5).standard_normal((N, 32), np.float32)).astype(jnp.bfloat16)
    out = gpu.grouped_matmul(xin, jnp.swapaxes(w, 1, 2), gs, transpose_w=True, **SMALL)
    _check(out, reference.grouped_matmul(xin, w, gs), sizes, N)
    ob = gpu.grouped_matmul(xin, jnp.swapaxes(w, 1, 2), gs, transpose_w=True, out_dtype=jnp.bfloat16, **SMALL)
    np.testing.assert_array_equal(np.asarray(ob), np.asarray(quant.round_to(out, jnp.bfloat16)))


def test_tile_map():
    meta = np.asarray(gpu.tile_map(jnp.asarray([10, 0, 25, 3, 20], jnp.int32), 70, 16))
    assert meta.shape[1] == gpu.num_tiles(70, 5, 16)
    used = meta[:, meta[1] < meta[2]]
    # every row 0..69 lies in exactly one tile, and a tile never spans two groups
    rows = np.concatenate([np.arange(a, b) for a, b in zip(used[1], used[2])])
    np.testing.assert_array_equal(np.sort(rows), np.arange(70))
    np.testing.assert_array_equal(used[0], [0, 2, 2, 3, 4, 4, 5])         # group 5 = the rows past the groups
    assert (used[2] - used[1] <= 16).all()


def test_dispatch_formats_and_backends():
    N, K, O, sizes = 30, 64, 32, [4, 0, 21]
    for fmt in ("bf16", "fp8", "fp4"):
        x, node, gs = _inputs(N, K, O, sizes, seed=6, fmt=fmt)
        ref = gm.grouped_matmul(x, node, gs, backend="reference")
        _check(ref, _ref(x, node, gs), sizes, N)
        if fmt == "fp8":                                 # the kernel, its default launch (w_lhs), interpret mode
            _check(gm.grouped_matmul(x, node, gs, backend="gpu"), ref, sizes, N)
    assert gm.default_backend("cpu") == "reference" and gm.default_backend("cuda") == "gpu"
    with pytest.raises(ValueError, match="unknown backend"):
        gm.grouped_matmul(x, node, gs, backend="tpu")
    with pytest.raises(ValueError, match=r"fp4 scale \(.*\) does not match w"):    # e.g. a transposed scale
        gpu.grouped_matmul(x, node["weight"], gs, jnp.swapaxes(node["scale"], 1, 2), interpret=True)
    # a bare weight array and bf16 output; fp32 x takes the reference
    x, node, gs = _inputs(N, K, O, sizes, seed=6)
    ob = gm.grouped_matmul(x, node["weight"], gs, backend="gpu", out_dtype=jnp.bfloat16)
    assert ob.dtype == jnp.bfloat16
    x32 = x.astype(jnp.float32)
    np.testing.assert_array_equal(np.asarray(gm.grouped_matmul(x32, node, gs, backend="gpu")),
                                  np.asarray(gm.grouped_matmul(x32, node, gs, backend="reference")))


def test_dispatch_gradients_equal_reference():
    N, K, O, sizes = 40, 32, 48, [9, 0, 14, 11]
    x, node, gs = _inputs(N, K, O, sizes, seed=7)
    ct = jnp.asarray(np.random.default_rng(8).standard_normal((N, O), np.float32))

    def loss(backend):
        return lambda x, w: jnp.sum(gm.grouped_matmul(x, {"weight": w}, gs, backend=backend) * ct)

    (v1, g1), (v2, g2) = (jax.jit(jax.value_and_grad(loss(be), argnums=(0, 1)))(x, node["weight"])
                          for be in ("gpu", "reference"))
    np.testing.assert_allclose(float(v1), float(v2), rtol=1e-5)
    for a, b in zip(g1, g2):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.abs(b).max() > 0
        # dx: the kernel on dy rounded to bf16 (the reference keeps dy in fp32): bf16-rounding close
        assert np.linalg.norm(a - b) / np.linalg.norm(b) < 4e-3
    assert not np.asarray(g1[0])[sum(sizes):].any()
    # FP8 weights: gradient w.r.t. x only, through the reference
    x, node8, gs = _inputs(N, K, O, sizes, seed=7, fmt="fp8")
    f = lambda be: jax.grad(lambda x: jnp.sum(gm.grouped_matmul(x, node8, gs, backend=be) * ct))(x)
    np.testing.assert_allclose(np.asarray(f("gpu"), np.float32), np.asarray(f("reference"), np.float32),
                               rtol=1e-6, atol=1e-6)


def _dw64(x, dy, sizes):
    """float64 dw[e] = dy_e^T x_e of the (bf16) inputs."""
    x, dy = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    ends = np.cumsum(sizes)
    return np.stack([dy[e - n:e].T @ x[e - n:e] for n, e in zip(sizes, ends)])


def _check_bf16_ulp(out, ref):
    """bf16 `out` within one bf16 ulp of the float64 `ref` (plus a hair for the fp32 accumulation)."""
    out = np.asarray(out, np.float64)
    ulp = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(ref), 1e-30))) - 7)
    assert (np.abs(out - ref) <= ulp + 1e-6 * np.abs(ref).max()).all()


# N, in, out, group sizes, dw tiles (block_o, block_i, block_r): empty groups (first, middle, last), groups larger
# than block_r, rows past the groups, in/out not multiples of the tiles, E = 1 (all rows / some rows)
DW_CASES = [(70, 48, 40, [10, 0, 25, 3, 20], (16, 32, 8)), (60, 32, 32, [0, 41, 0], (32, 16, 16)),
            (33, 40, 24, [33], (16, 16, 8)), (50, 16, 48, [21], (32, 16, 16)), (24, 32, 16, [1] * 9 + [0] * 7, (16, 32, 8))]


@pytest.mark.parametrize("case", DW_CASES)
def test_gpu_dw_kernel_matches_float64(case):
    N, I, O, sizes, (bo, bi, br) = case
    rng = np.random.default_rng(N)
    x = rng.standard_normal((N, I), np.float32)
    dy = rng.standard_normal((N, O), np.float32)
    tail = int(np.sum(sizes))
    x[tail:] = np.nan                                                     # rows past the groups: garbage that
    dy[tail:, ::2], dy[tail:, 1::2] = np.inf, 1e30                        # must not leak into any dw[e]
    x, dy = jnp.asarray(x).astype(jnp.bfloat16), jnp.asarray(dy).astype(jnp.bfloat16)
    gs = jnp.asarray(sizes, jnp.int32)
    kw = dict(block_o=bo, block_i=bi, block_r=br, interpret=True)
    ref = _dw64(x, dy, sizes)
    out = gpu.grouped_matmul_dw(x, dy, gs, **kw)
    assert out.shape == (len(sizes), O, I) and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    assert not np.asarray(out)[np.asarray(sizes) == 0].any()              # empty groups: exactly 0
    ob = gpu.grouped_matmul_dw(x, dy, gs, out_dtype=jnp.bfloat16, **kw)
    assert ob.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(ob), np.asarray(quant.round_to(out, jnp.bfloat16)))   # RNE
    _check_bf16_ulp(ob, ref)


def test_dispatch_weight_gradient_kernel():
    """grad w.r.t. x and a bf16 w through the custom_vjp (dw: the Pallas dw kernel at its default tiles, a group
    longer than block_r) == the reference backend's, and dw == float64 dy_e^T x_e of the bf16-rounded dy."""
    rng = np.random.default_rng(10)
    N, K, O, sizes = 160, 32, 48, [0, 97, 0, 30, 1]                        # 32 rows past the groups
    x, node, gs = _inputs(N, K, O, sizes, seed=11)
    ct = rng.standard_normal((N, O), np.float32)
    ct[sum(sizes):] = 1e6                                                 # cotangent of the constant-0 rows
    ct = jnp.asarray(ct)

    def grads(backend):
        loss = lambda x, w: jnp.sum(gm.grouped_matmul(x, {"weight": w}, gs, backend=backend) * ct)
        return [np.asarray(g, np.float32) for g in jax.jit(jax.grad(loss, argnums=(0, 1)))(x, node["weight"])]

    (dx, dw), (dx_ref, dw_ref) = grads("gpu"), grads("reference")
    _check_bf16_ulp(dw, _dw64(x, ct.astype(jnp.bfloat16), sizes))
    for a, b in ((dx, dx_ref), (dw, dw_ref)):                            # the kernels round dy to bf16
        assert np.linalg.norm(a - b) / np.linalg.norm(b) < 4e-3
    assert not dw[[0, 2]].any() and not dx[sum(sizes):].any()


def test_capacity_einsum_matches_reference():
    N, K, O, sizes = 50, 32, 24, [10, 0, 30, 4]
    x, node, gs = _inputs(N, K, O, sizes, seed=9)
    cap = capacity.capacity_for(gs, 8)
    assert cap == 32
    out = capacity.grouped_matmul(x, node["weight"], gs, capacity=cap)
    _check(out, _ref(x, node, gs), sizes, N)


def test_gpu_kernel_lowers_for_cuda():
    """Pallas -> Triton IR lowering for every weight format at a Flash-like shape (no GPU needed), and for every
    FP4 decode variant (the ops they use exist in Pallas Triton: tt.split, int/bf16 bitcasts, trunci)."""
    E, O, K, N = 8, 256, 512, 1000
    gs = jax.ShapeDtypeStruct((E,), jnp.int32)
    x = jax.ShapeDtypeStruct((N, K), jnp.bfloat16)
    nodes = [(jax.ShapeDtypeStruct((E, O, K), jnp.bfloat16), None, False),
             (jax.ShapeDtypeStruct((E, K, O), jnp.bfloat16), None, True),
             (jax.ShapeDtypeStruct((E, O, K), jnp.float8_e4m3fn),
              jax.ShapeDtypeStruct((E, O // 128, K // 128), jnp.float8_e8m0fnu), False),
             (jax.ShapeDtypeStruct((E, O, K // 2), jnp.int8),
              jax.ShapeDtypeStruct((E, O, K // 32), jnp.float8_e8m0fnu), False)]
    for (w, s, tr), n in [(nd, N) for nd in nodes] + [(nd, 6) for nd in nodes if not nd[2]]:  # + decode launch
        x = jax.ShapeDtypeStruct((n, K), jnp.bfloat16)
        f = jax.jit(lambda x, w, g, s: gpu.grouped_matmul(x, w, g, s, transpose_w=tr, out_dtype=jnp.bfloat16))
        exp = export.export(f, platforms=["cuda"],
                            disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])
        assert "triton" in exp(x, w, gs, s).mlir_module()
    # the FP4 decode variants, every combination, at both launches (DEFAULTS and DECODE_DEFAULTS), w_lhs both ways;
    # and the parity variants with small tiles (block_k 32: the parity dots have K = 16)
    w, s, _ = nodes[3]
    small = dict(block_m=16, block_n=32, block_k=32)
    combos = list(itertools.product([(N, {}), (6, {})], gpu.TILE_DECODES, (False, True, "strided", "permuted"),
                                    (True, False)))
    combos += [((N, small), "bits", parity, w_lhs) for parity in (True, "strided", "permuted")
               for w_lhs in (True, False)]
    for (n, launch), decode, parity, w_lhs in combos:
        x = jax.ShapeDtypeStruct((n, K), jnp.bfloat16)
        f = jax.jit(lambda x, w, g, s: gpu.grouped_matmul(x, w, g, s, out_dtype=jnp.bfloat16, w_lhs=w_lhs,
                                                          fp4_decode=decode, fp4_parity=parity, **launch))
        exp = export.export(f, platforms=["cuda"],
                            disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])
        assert "triton" in exp(x, w, gs, s).mlir_module()
    x = jax.ShapeDtypeStruct((N, K), jnp.bfloat16)
    f = jax.jit(lambda x, dy, g: gpu.grouped_matmul_dw(x, dy, g, out_dtype=jnp.bfloat16))
    exp = export.export(f, platforms=["cuda"],
                        disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])
    assert "triton" in exp(x, jax.ShapeDtypeStruct((N, O), jnp.bfloat16), gs).mlir_module()


# ---- split-K (launch option split_k; the decode default through gpu.decode_split_k) ----------------------------

def test_decode_split_k_rule():
    """The decode split rule at the Flash expert shapes (16 x 128 x 128 decode tiles) and its limits."""
    flash = dict(block_n=128, block_k=128)
    for E in (256, 128):                                   # one GPU, or two with expert parallelism
        assert gpu.decode_split_k(6, E, 2048, 4096, **flash) == 8           # w1/w3, batch 1: 768 programs x 4 steps
        assert gpu.decode_split_k(6, E, 4096, 2048, **flash) == 4           # w2, batch 1: 768 programs x 4 steps
        assert gpu.decode_split_k(24, E, 2048, 4096, **flash) == 2          # batch 4
        assert gpu.decode_split_k(24, E, 4096, 2048, **flash) == 1
        for N in (48, 192):                                                 # batch 8, 32: enough row tiles
            assert gpu.decode_split_k(N, E, 2048, 4096, **flash) == 1
            assert gpu.decode_split_k(N, E, 4096, 2048, **flash) == 1
    assert gpu.decode_split_k(1, 256, 2048, 4096, **flash) == 16          # 1 row: 16 programs -> 2 steps each
    assert gpu.decode_split_k(1, 256, 2048, 4096, min_steps=4, **flash) == 8
    assert gpu.decode_split_k(6, 256, 2048, 256, **flash) == 1            # 2 K steps: no split leaves >= 2
    assert gpu.decode_split_k(6, 256, 2048, 96 * 128, **flash) == 6       # 96 steps: 6 is the first to reach 528
    assert gpu.decode_split_k(6, 256, 2048, 5 * 128, **flash) == 1        # 5 steps: no divisor <= 2.5
    assert gpu.decode_split_k(0, 256, 2048, 4096, **flash) == 1
    # the fp32 partials (8 s N O bytes, written + read) stay within half the weight bytes read
    assert gpu.decode_split_k(4000, 2, 2048, 4096, w_bytes=gpu.W_BYTES["fp4"], **flash) == 1
    assert gpu.decode_split_k(30, 2, 2048, 4096, w_bytes=gpu.W_BYTES["fp4"], **flash) == 8     # not 16: the cap
    assert gpu.decode_split_k(30, 2, 2048, 4096, w_bytes=gpu.W_BYTES["bf16"], **flash) == 16
    for N, E, O, K in itertools.product((1, 3, 6, 24, 100), (8, 256), (256, 2048), (1024, 4096)):
        s = gpu.decode_split_k(N, E, O, K, **flash)
        assert (K // 128) % s == 0 and K // 128 // s >= 2 or s == 1


# N, K, O, group sizes: empty first/middle/last groups, groups of one row, rows past the groups, O not a multiple
# of the column tile; K = 512 (block_k 64: 8 K steps; FP8: 4 scale blocks, FP4: 16)
SPLIT_CASE = (120, 512, 144, [0, 40, 1, 0, 60, 1, 0])                  # N >= 16 E: not the decode launch


@pytest.mark.parametrize("fmt,split", [("bf16", 8), ("fp8", 2), ("fp4", 4)])
def test_gpu_kernel_split_k_matches_reference(fmt, split):
    """split_k > 1 == the reference for every weight format, K ranges of 1 K step (bf16), 2 FP8 scale blocks, 4 FP4
    scale blocks; rows past the groups exactly 0; bf16 output = RNE of the fp32 sum of the partials. split_k = 1
    (the unsplit kernel) == the reference, and is the default outside decode."""
    N, K, O, sizes = SPLIT_CASE
    x, node, gs = _inputs(N, K, O, sizes, seed=21, fmt=fmt)
    ref = _ref(x, node, gs)
    kw = dict(block_m=16, block_n=32, block_k=64, interpret=True)
    run = lambda **k: gpu.grouped_matmul(x, node["weight"], gs, node.get("scale"), **kw, **k)
    out = run(split_k=split)
    assert out.dtype == jnp.float32
    _check(out, ref, sizes, N)
    if fmt == "bf16":
        one = run(split_k=1)
        _check(one, ref, sizes, N)
        np.testing.assert_array_equal(np.asarray(run()), np.asarray(one))    # no split by default
    if fmt == "fp4":
        ob = run(split_k=split, out_dtype=jnp.bfloat16)
        assert ob.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(ob), np.asarray(quant.round_to(out, jnp.bfloat16)))


def _decode_case(K=1024, O=256, fmt="fp4", seed=12):
    """7 rows over 20 experts (groups of 1-3 rows, most empty) plus 3 rows past the groups: the decode launch."""
    sizes = [0] * 20
    for e in (1, 5, 5, 9, 19, 19, 19):
        sizes[e] += 1
    N = 10
    x, node, gs = _inputs(N, K, O, sizes, seed=seed, fmt=fmt)
    return N, K, O, sizes, x, node, gs


def test_gpu_kernel_decode_launch_splits_k():
    """At decode the default launch splits K (decode_split_k: 8 K steps of 128 -> 4 programs per row/out tile) and
    equals the reference; the FP4 decode variants work with split-K (their K ranges stay block_k-aligned)."""
    N, K, O, sizes, x, node, gs = _decode_case()
    assert gpu.decode_split_k(N, len(sizes), O, K, block_n=128, block_k=128) == 4
    ref = _ref(x, node, gs)
    _check(gpu.grouped_matmul(x, node["weight"], gs, node["scale"], interpret=True), ref, sizes, N)
    _check(gpu.grouped_matmul(x, node["weight"], gs, node["scale"], split_k=1, interpret=True), ref, sizes, N)
    for decode, parity, s in (("bits_exp", "permuted", 2), ("bits", True, 8)):
        out = gpu.grouped_matmul(x, node["weight"], gs, node["scale"], fp4_decode=decode, fp4_parity=parity,
                                 split_k=s, interpret=True)
        _check(out, ref, sizes, N)


def test_gpu_kernel_split_k_option_values():
    x, node, gs = _inputs(8, 256, 32, [3, 5], fmt="fp4")                  # 4 K steps of 64
    for bad in (3, 8, 0, -2, 2.0):
        with pytest.raises(ValueError, match="split_k"):
            gpu.grouped_matmul(x, node["weight"], gs, node["scale"], block_k=64, split_k=bad, interpret=True)


def test_dispatch_gradients_with_split_k():
    """The custom_vjp with a split-K forward (decode shapes: the automatic split, and a forced one through
    `launch`): value and dx (the transposed-weight kernel, unsplit) and dw (bf16 weight) == the reference's."""
    N, K, O, sizes, x, node, gs = _decode_case(K=512, O=128, fmt="bf16", seed=13)
    ct = jnp.asarray(np.random.default_rng(14).standard_normal((N, O), np.float32))
    assert gpu.decode_split_k(N, len(sizes), O, K, block_n=128, block_k=64) > 1

    def grads(backend, launch=None):
        loss = lambda x, w: jnp.sum(gm.grouped_matmul(x, {"weight": w}, gs, backend=backend, launch=launch) * ct)
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x, node["weight"])

    v_ref, g_ref = grads("reference")
    for launch in (None, {"split_k": 2, "block_n": 64}):
        v, g = grads("gpu", launch)
        np.testing.assert_allclose(float(v), float(v_ref), rtol=1e-5)
        for a, b in zip(g, g_ref):
            a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
            assert np.abs(b).max() > 0 and np.linalg.norm(a - b) / np.linalg.norm(b) < 4e-3
        assert not np.asarray(g[0])[sum(sizes):].any()
    # the forward through the dispatch == the kernel called directly with the same split
    y = gm.grouped_matmul(x, node, gs, backend="gpu", launch={"split_k": 2})
    np.testing.assert_array_equal(np.asarray(y), np.asarray(gpu.grouped_matmul(x, node["weight"], gs, split_k=2,
                                                                               interpret=True)))


def _lower_cuda(f, *args):
    exp = export.export(jax.jit(f), platforms=["cuda"],
                        disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])
    return exp(*args).mlir_module()


def test_gpu_kernel_split_k_lowers_for_cuda():
    """Pallas -> Triton lowering with split-K at the Flash decode shapes (E = 256, w1/w3 [2048, 4096], w2
    [4096, 2048], FP4; batch 1, 8, 32 = 6, 48, 192 rows): the automatic decode launch (split 8 / 4 at batch 1),
    forced splits for FP8 and bf16 weights and the FP4 decode variants."""
    E = 256
    gs = jax.ShapeDtypeStruct((E,), jnp.int32)
    fp4 = lambda O, K: (jax.ShapeDtypeStruct((E, O, K // 2), jnp.int8),
                        jax.ShapeDtypeStruct((E, O, K // 32), jnp.float8_e8m0fnu))
    for (O, K), auto in (((2048, 4096), 8), ((4096, 2048), 4)):
        w, s = fp4(O, K)
        for n in (6, 48, 192):
            x = jax.ShapeDtypeStruct((n, K), jnp.bfloat16)
            mlir = _lower_cuda(lambda x, w, g, s: gpu.grouped_matmul(x, w, g, s, out_dtype=jnp.bfloat16), x, w, gs, s)
            assert "triton" in mlir and (f"grouped_matmul_fp4_split{auto}" in mlir) == (n == 6)
        x = jax.ShapeDtypeStruct((6, K), jnp.bfloat16)
        for decode, parity in (("bits", False), ("bits_exp", "permuted"), ("e4m3", True), ("e4m3", "strided")):
            f = lambda x, w, g, s: gpu.grouped_matmul(x, w, g, s, out_dtype=jnp.bfloat16, split_k=16,
                                                      fp4_decode=decode, fp4_parity=parity)
            assert "grouped_matmul_fp4_split16" in _lower_cuda(f, x, w, gs, s)
    O, K = 2048, 4096
    x = jax.ShapeDtypeStruct((6, K), jnp.bfloat16)
    w8 = jax.ShapeDtypeStruct((E, O, K), jnp.float8_e4m3fn)
    s8 = jax.ShapeDtypeStruct((E, O // 128, K // 128), jnp.float8_e8m0fnu)
    assert "grouped_matmul_fp8_split4" in _lower_cuda(
        lambda x, w, g, s: gpu.grouped_matmul(x, w, g, s, split_k=4), x, w8, gs, s8)
    wb = jax.ShapeDtypeStruct((E, O, K), jnp.bfloat16)
    assert "grouped_matmul_bf16_split8" in _lower_cuda(
        lambda x, w, g: gpu.grouped_matmul(x, w, g, out_dtype=jnp.bfloat16), x, wb, gs)
    wt = jax.ShapeDtypeStruct((E, K, O), jnp.bfloat16)                     # transposed weight (dx), forced split
    xt = jax.ShapeDtypeStruct((6, K), jnp.bfloat16)
    assert "grouped_matmul_bf16_split2" in _lower_cuda(
        lambda x, w, g: gpu.grouped_matmul(x, w, g, transpose_w=True, split_k=2), xt, wt, gs)


# ---- FP8 x FP8 dots (launch option mma="fp8": x quantised per 128 columns, FP8/FP4 weights as e4m3 tiles) -------

def _fp8_x(N, K, seed):
    """bf16 x that is FP8-representable per 128-column block (quant.fp8_sim output), rows of very different
    magnitudes (per-row scales 2^-12 .. 2^12) and one all-zero row."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, K)) * np.exp2(rng.integers(-12, 13, (N, 1)))
    x[N // 2] = 0.0
    return quant.fp8_sim(jnp.asarray(x, jnp.float32).astype(jnp.bfloat16), 128)


def test_fp8_blocks_exact_on_fp8_sim_values():
    x = _fp8_x(40, 512, seed=20)
    q, s = gpu.fp8_blocks(x)
    assert q.dtype == jnp.float8_e4m3fn and s.shape == (40, 4)
    back = (q.astype(jnp.float32).reshape(40, 4, 128) * s[..., None]).reshape(40, 512)
    np.testing.assert_array_equal(np.asarray(back), np.asarray(x.astype(jnp.float32)))
    sv = np.asarray(s)
    assert np.all(np.log2(sv) == np.round(np.log2(sv)))                         # powers of two
    amax = np.abs(np.asarray(x, np.float32)).reshape(40, 4, 128).max(-1)
    assert np.all(amax <= 448 * sv) and np.all((amax > 448 * sv / 2) | (amax == 0))   # the smallest such
    # a value at exactly 448 * 2^k takes s = 2^k (no rounding of amax / 448 upwards)
    y = jnp.zeros((1, 128), jnp.float32).at[0, 3].set(448.0 * 2.0 ** -5)
    np.testing.assert_array_equal(np.asarray(gpu.fp8_blocks(y)[1]), [[2.0 ** -5]])


@pytest.mark.parametrize("fmt", ["fp4", "fp8"])
def test_gpu_kernel_fp8_mma_matches_reference(fmt):
    """mma="fp8" == the reference on an FP8-representable x: at decode (the DECODE_DEFAULTS launch, its automatic
    split-K, w_lhs both ways) and with many rows per group (DEFAULTS; block_k 64 = two FP4 scale blocks per step)."""
    few = [0] * 20
    for e in (1, 5, 5, 9, 19, 19, 19):
        few[e] += 1
    for N, K, O, sizes in ((10, 512, 256, few), (300, 256, 192, [120, 0, 150])):
        _, node, gs = _inputs(N, K, O, sizes, seed=N + 2, fmt=fmt)
        x = _fp8_x(N, K, seed=N)
        ref = _ref(x, node, gs)
        launches = [dict(), dict(w_lhs=False)] + ([dict(split_k=2), dict(block_k=32)] if N < 100 else [])
        for kw in launches:
            out = gpu.grouped_matmul(x, node["weight"], gs, node["scale"], mma="fp8", interpret=True, **kw)
            _check(out, ref, sizes, N)
        ob = gpu.grouped_matmul(x, node["weight"], gs, node["scale"], mma="fp8", out_dtype=jnp.bfloat16,
                                interpret=True)
        assert ob.dtype == jnp.bfloat16


def test_gpu_kernel_fp8_mma_rounds_other_inputs():
    """On an x that is not FP8-representable, mma="fp8" multiplies x's per-128-block FP8 rounding (fp8_blocks)."""
    N, K, O, sizes = 12, 256, 64, [4, 8]
    x, node, gs = _inputs(N, K, O, sizes, seed=21, fmt="fp4")
    q, s = gpu.fp8_blocks(x)
    xq = (q.astype(jnp.float32).reshape(N, 2, 128) * s[..., None]).reshape(N, K).astype(jnp.bfloat16)
    assert np.any(np.asarray(xq) != np.asarray(x))
    out = gpu.grouped_matmul(x, node["weight"], gs, node["scale"], mma="fp8", interpret=True)
    _check(out, _ref(xq, node, gs), sizes, N)


def test_gpu_kernel_fp8_mma_option_values():
    x, node, gs = _inputs(8, 256, 32, [3, 5])
    with pytest.raises(ValueError, match="mma='fp8' needs FP8 or FP4 weights"):
        gpu.grouped_matmul(x, node["weight"], gs, mma="fp8", interpret=True)
    _, node4, _ = _inputs(8, 256, 32, [3, 5], fmt="fp4")
    with pytest.raises(ValueError, match="mma="):
        gpu.grouped_matmul(x, node4["weight"], gs, node4["scale"], mma="fp16", interpret=True)


def test_gpu_kernel_fp8_mma_lowers_for_cuda():
    """Pallas -> Triton lowering of the FP8 x FP8 dots (e4m3 operands, tt.split of the scale blocks) at the Flash
    shapes: FP4 w1 at batch 1 and 32 (decode launch, w_lhs both ways), 8K rows (DEFAULTS), and FP8 weights."""
    E = 256
    gs = jax.ShapeDtypeStruct((E,), jnp.int32)
    w4 = (jax.ShapeDtypeStruct((E, 2048, 2048), jnp.int8), jax.ShapeDtypeStruct((E, 2048, 128), jnp.float8_e8m0fnu))
    w8 = (jax.ShapeDtypeStruct((E, 2048, 4096), jnp.float8_e4m3fn),
          jax.ShapeDtypeStruct((E, 16, 32), jnp.float8_e8m0fnu))
    for (w, s), n, kw in [(w4, 6, {}), (w4, 192, {}), (w4, 192, {"w_lhs": False}), (w4, 8192, {}),
                          (w8, 192, {}), (w8, 8192, {})]:
        x = jax.ShapeDtypeStruct((n, 4096), jnp.bfloat16)
        mlir = _lower_cuda(lambda x, w, g, s: gpu.grouped_matmul(x, w, g, s, out_dtype=jnp.bfloat16, mma="fp8",
                                                                 **kw), x, w, gs, s)
        assert "triton" in mlir


def test_fp4_halves_layout_roundtrip():
    """quant.fp4_to_halves: per 64 elements byte i holds (i, 32 + i) (uint8); fp4_from_halves inverts it; the
    dequantised weight is the same in both layouts."""
    rng = np.random.default_rng(40)
    w = jnp.asarray(rng.integers(-128, 128, (3, 5, 64)), jnp.int8)                # [.., O, K/2], K = 128
    h = quant.fp4_to_halves(w)
    assert h.shape == w.shape and h.dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(quant.fp4_from_halves(h)), np.asarray(w))
    nib = lambda a: np.stack([np.asarray(a).view(np.uint8) & 15, np.asarray(a).view(np.uint8) >> 4], -1)
    k = nib(w).reshape(3, 5, 128)                                                   # natural element order
    hb = nib(h).reshape(3, 5, 2, 32, 2)                                             # [group, byte, nibble]
    np.testing.assert_array_equal(hb[..., 0], k.reshape(3, 5, 2, 2, 32)[..., 0, :])   # low: the group's 0..31
    np.testing.assert_array_equal(hb[..., 1], k.reshape(3, 5, 2, 2, 32)[..., 1, :])   # high: 32..63
    s = jnp.asarray(rng.integers(110, 130, (3, 5, 4)), jnp.uint8).view(jnp.float8_e8m0fnu)
    np.testing.assert_array_equal(np.asarray(quant.dequant_fp4_weight(h, s, jnp.float32)),
                                  np.asarray(quant.dequant_fp4_weight(w, s, jnp.float32)))
    with pytest.raises(ValueError, match="n % 32"):
        quant.fp4_to_halves(w[..., :16])
    with pytest.raises(ValueError, match="uint8"):
        quant.fp4_from_halves(w)


def test_gpu_kernel_fp4_halves_and_asm():
    """FP4 weights in the halves layout (uint8: two scale-block dots per 64 columns, no interleave), with FP8 x FP8
    dots and with bf16 dots, and fp4_decode="asm" (interpret mode runs the per-element rewrite; the PTX is checked
    on the GPU by scripts/sweep_decode_kernels.py) equal the reference, at decode and with many rows."""
    few = [0] * 20
    for e in (1, 5, 5, 9, 19, 19, 19):
        few[e] += 1
    decode = [(dict(mma="fp8"), kw) for kw in (dict(), dict(w_lhs=False), dict(block_k=64, split_k=2))]
    decode += [(dict(mma="bf16"), dict()), (dict(mma="fp8", fp4_decode="asm", halves=False), dict(w_lhs=False))]
    for N, K, O, sizes, runs in ((10, 512, 256, few, decode),
                                 (160, 256, 128, [70, 0, 90], [(dict(mma="bf16"), {}), (dict(mma="fp8"), {})])):
        _, node, gs = _inputs(N, K, O, sizes, seed=N + 3, fmt="fp4")
        x = _fp8_x(N, K, seed=N + 1)
        ref = _ref(x, node, gs)
        wh = quant.fp4_to_halves(node["weight"])
        for extra, kw in runs:
            w = wh if extra.pop("halves", True) else node["weight"]
            _check(gpu.grouped_matmul(x, w, gs, node["scale"], interpret=True, **kw, **extra), ref, sizes, N)
    x, node, gs = _inputs(8, 256, 32, [3, 5], fmt="fp4")
    wh = quant.fp4_to_halves(node["weight"])
    with pytest.raises(ValueError, match="needs mma='fp8' or the halves"):
        gpu.grouped_matmul(x, node["weight"], gs, node["scale"], mma="bf16", fp4_decode="asm", interpret=True)
    with pytest.raises(ValueError, match="halves FP4 layout"):
        gpu.grouped_matmul(x, wh, gs, node["scale"], fp4_parity=True, interpret=True)
    with pytest.raises(ValueError, match="no usable block_k"):
        gpu.grouped_matmul(x, wh, gs, node["scale"], mma="fp8", block_k=32, interpret=True)
    # the dispatch (reference backend too) takes the uint8 layout as the same weight
    _check(gm.grouped_matmul(x, {"weight": wh, "scale": node["scale"]}, gs, backend="reference"),
           _ref(x, node, gs), [3, 5], 8)


def test_fp4_kernel_layout_tiles():
    """quant.fp4_to_halves stores a weight with out % 128 == 0 in 4 KB tiles: the block of rows 128t..128t+127 and
    bytes 32c..32c+31 of the halves is contiguous, blocks in (t, c) order; fp4_from_halves undoes it; tiles=False
    keeps the untiled halves (A/B only); the dequantised weight is the same in every form."""
    rng = np.random.default_rng(41)
    w = jnp.asarray(rng.integers(-128, 128, (2, 256, 64)), jnp.int8)               # [E, O, K/2], K = 128
    h, flat = quant.fp4_to_halves(w), quant.fp4_to_halves(w, tiles=False)
    assert quant.fp4_tiled(h.shape) and not quant.fp4_tiled((2, 192, 64))
    blocks = np.asarray(h).reshape(2, 2 * 2, 128, 32)                               # contiguous 4 KB blocks
    for t, c in itertools.product(range(2), range(2)):
        np.testing.assert_array_equal(blocks[:, 2 * t + c],
                                      np.asarray(flat)[:, 128 * t:128 * (t + 1), 32 * c:32 * (c + 1)])
    np.testing.assert_array_equal(np.asarray(quant.fp4_from_halves(h)), np.asarray(w))
    np.testing.assert_array_equal(np.asarray(quant.fp4_from_halves(flat, tiles=False)), np.asarray(w))
    s = jnp.asarray(rng.integers(110, 130, (2, 256, 4)), jnp.uint8).view(jnp.float8_e8m0fnu)
    np.testing.assert_array_equal(np.asarray(quant.dequant_fp4_weight(h, s, jnp.float32)),
                                  np.asarray(quant.dequant_fp4_weight(w, s, jnp.float32)))
    with pytest.raises(ValueError, match="out % 128"):
        quant.fp4_to_halves(w[:, :192], tiles=True)


def test_gpu_kernel_fp4_tiles_launches():
    """The kernel reads the tiled layout at every out-tile width (block_n 64 and 128 inside one tile, 256 across
    two, 96 with clamped columns) and the untiled halves with fp4_tiles=False; fp4_tiles on a layout without tiles
    is an error."""
    N, K, O, sizes = 12, 256, 384, [3, 0, 7, 2]
    _, node, gs = _inputs(N, K, O, sizes, seed=43, fmt="fp4")
    x = _fp8_x(N, K, seed=44)
    ref = _ref(x, node, gs)
    wt, wf = quant.fp4_to_halves(node["weight"]), quant.fp4_to_halves(node["weight"], tiles=False)
    for bn in (64, 128, 256, 96):
        for mma in ("fp8", "bf16"):
            _check(gpu.grouped_matmul(x, wt, gs, node["scale"], block_n=bn, mma=mma, interpret=True), ref, sizes, N)
    _check(gpu.grouped_matmul(x, wf, gs, node["scale"], mma="fp8", fp4_tiles=False, interpret=True), ref, sizes, N)
    _, node2, gs2 = _inputs(8, 256, 64, [3, 5], fmt="fp4")
    with pytest.raises(ValueError, match="fp4_tiles needs"):
        gpu.grouped_matmul(x[:8], quant.fp4_to_halves(node2["weight"]), gs2, node2["scale"], fp4_tiles=True,
                           interpret=True)


def test_gpu_kernel_fp4_asm_lowers_for_cuda():
    """The inline-PTX decode (the halves layout's default) and the halves layout lower to
    Triton at the Flash shapes (decode and 8K rows)."""
    E = 256
    gs = jax.ShapeDtypeStruct((E,), jnp.int32)
    w, s = jax.ShapeDtypeStruct((E, 2048, 2048), jnp.int8), jax.ShapeDtypeStruct((E, 2048, 128), jnp.float8_e8m0fnu)
    wh = jax.ShapeDtypeStruct(w.shape, jnp.uint8)
    for n, ww, kw in [(192, w, dict(mma="fp8")), (192, w, dict(mma="fp8", fp4_decode="e4m3")),
                      (192, wh, dict(mma="fp8")), (6, wh, dict(mma="fp8", w_lhs=False)), (8192, wh, {}),
                      (192, wh, dict(mma="fp8", fp4_tiles=False))]:
        x = jax.ShapeDtypeStruct((n, 4096), jnp.bfloat16)
        mlir = _lower_cuda(lambda x, w, g, s: gpu.grouped_matmul(x, w, g, s, out_dtype=jnp.bfloat16, **kw),
                           x, ww, gs, s)
        assert "triton" in mlir
        assert ("0x1C1C1C1C" in mlir) == (ww is wh and kw.get("fp4_decode") != "e4m3")   # the PTX: halves default


def test_dispatch_fp8_act_takes_fp8_mma():
    """grouped_matmul(..., fp8_act=True) on FP4 weights at decode runs the kernel with mma="fp8", equals the
    reference and keeps dx (the reference VJP on the dequantised weight); in % 128 != 0 and many rows per group
    (prefill) keep the bf16 dots. Which path ran is told apart on an x that is NOT FP8-representable (a broken
    fp8_act promise): there mma="fp8" multiplies x's FP8 rounding and the bf16 dots do not."""
    N, K, O, sizes = 10, 256, 64, [3, 0, 5]
    raw, node, gs = _inputs(N, K, O, sizes, seed=30, fmt="fp4")
    call = lambda a, nd, g, **kw: np.asarray(gpu.grouped_matmul(a, nd["weight"], g, nd["scale"], interpret=True, **kw))
    y = np.asarray(gm.grouped_matmul(raw, node, gs, backend="gpu", fp8_act=True))
    np.testing.assert_array_equal(y, call(raw, node, gs, mma="fp8"))
    assert np.any(y != call(raw, node, gs, mma="bf16"))
    x = _fp8_x(N, K, seed=31)
    _check(gm.grouped_matmul(x, node, gs, backend="gpu", fp8_act=True), _ref(x, node, gs), sizes, N)
    ct = jnp.asarray(np.random.default_rng(32).standard_normal((N, O), np.float32))
    dx = jax.grad(lambda a: jnp.sum(gm.grouped_matmul(a, node, gs, backend="gpu", fp8_act=True) * ct))(x)
    dx_ref = jax.grad(lambda a: jnp.sum(gm.grouped_matmul(a, node, gs, backend="reference") * ct))(x)
    np.testing.assert_allclose(np.asarray(dx, np.float32), np.asarray(dx_ref, np.float32), rtol=1e-6, atol=1e-6)
    # in = 96: not a multiple of 128 -> the bf16 dots (no error)
    _, node96, _ = _inputs(N, 96, O, sizes, seed=33, fmt="fp4")
    np.testing.assert_array_equal(np.asarray(gm.grouped_matmul(raw[:, :96], node96, gs, backend="gpu", fp8_act=True)),
                                  call(raw[:, :96], node96, gs))
    # 60 rows over 3 groups (>= 16 per group): not decode -> the bf16 dots
    raw60, node60, gs60 = _inputs(60, K, O, [20, 25, 15], seed=34, fmt="fp4")
    launch = dict(block_m=16, block_n=32, block_k=64)
    y60 = np.asarray(gm.grouped_matmul(raw60, node60, gs60, backend="gpu", fp8_act=True, launch=launch))
    np.testing.assert_array_equal(y60, call(raw60, node60, gs60, mma="bf16", **launch))
    assert np.any(y60 != call(raw60, node60, gs60, mma="fp8", **launch))



"""cachegen: symbols round-trip bit-exactly through the rANS streams, reconstruction stays within each
level's bound, codebook and per-chunk tables, params, and the typed errors of bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from codec import CodecError, codec_from_params, make_codec
from codec.cachegen import LEVELS, CacheGenCodec, _bf16_to_f32, count_symbols, quantize
from codec.codebook import Codebook, CodebookRegistry, codebooks, profile_codebook
from codec.profile import profile_kv
from codec.rans import TOTAL, CodingTables, normalize_freqs

SHAPE = (3, 2, 40, 2, 24)  # L, 2, T, H, D: C = 48 is not a multiple of the 16-channel stream group


def kv_like(shape=SHAPE, seed=0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    x[:, 0, :, 0, 3] *= 8  # an outlier key channel, as real models have
    x[:, :, 0] *= 5  # a sink-like first token
    return x.to(dtype)


def decode(codec, payload, like):
    out = torch.empty_like(like)
    codec_from_params(codec.name, codec.params()).decode(memoryview(payload), out)
    return out


def symbols_of(codec: CacheGenCodec, out: torch.Tensor, step_bits: np.ndarray) -> np.ndarray:
    """Recover symbols from a float32 reconstruction: exact, since out = (sym - M) * step."""
    L, _, T, H, D = out.shape
    step = _bf16_to_f32(step_bits).reshape(L * 2, 1, H * D)
    x = out.reshape(L * 2, T, H * D).numpy()
    return np.rint(x / step).astype(np.int64) + codec.spec.m


@pytest.mark.parametrize("level", sorted(LEVELS))
def test_symbols_decode_bit_exactly_per_chunk_tables(level):
    kv = kv_like(seed=level)
    c = make_codec("cachegen", level)
    payload = c.encode(kv)
    out = decode(c, payload, kv)
    sym, bits = quantize(kv, c.spec)
    assert np.array_equal(symbols_of(c, out, bits), sym.astype(np.int64))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("level", sorted(LEVELS))
def test_error_within_level_bound(level, dtype):
    kv = kv_like(seed=10 + level, dtype=dtype)
    c = CacheGenCodec(level)
    out = decode(c, c.encode(kv), kv)
    _, bits = quantize(kv, c.spec)
    L, _, T, H, D = kv.shape
    step = torch.from_numpy(_bf16_to_f32(bits).copy()).reshape(L, 2, 1, H, D)
    eps = {torch.float16: 2**-11, torch.bfloat16: 2**-8, torch.float32: 2**-23}[dtype]
    bound = step / 2 * (1 + 1e-5) + out.float().abs() * eps
    assert ((out.float() - kv.float()).abs() <= bound).all()
    # and the level's relative error is what its alphas promise, finer levels strictly smaller
    rel = ((out.float() - kv.float()).norm() / kv.float().norm()).item()
    assert rel < {1: 0.45, 2: 0.22, 3: 0.1, 4: 0.04}[level]


def test_levels_trade_size_for_error():
    kv = kv_like(shape=(4, 2, 128, 2, 32), seed=3)
    sizes, errs = [], []
    for level in sorted(LEVELS):
        c = CacheGenCodec(level)
        p = c.encode(kv)
        sizes.append(len(p))
        errs.append(((decode(c, p, kv) - kv).norm() / kv.norm()).item())
    assert sizes == sorted(set(sizes)) and errs == sorted(set(errs), reverse=True)


def _codebook(model: str, chunks: list[torch.Tensor]) -> Codebook:
    counts = {}
    for lv, spec in LEVELS.items():
        acc = None
        for ch in chunks:
            acc = count_symbols(ch, spec, acc)
        counts[lv] = acc
    L, _, _, H, D = chunks[0].shape
    return profile_codebook(model, counts, L, H * D)


def test_codebook_round_trip_and_smaller_payload(tmp_path):
    train = [kv_like(shape=(2, 2, 64, 2, 16), seed=s) for s in range(4)]
    cb = _codebook("test-model-cb1", train)
    path = cb.save(tmp_path)
    loaded = Codebook.load(path)
    assert loaded.digest == cb.digest and loaded.fingerprint == cb.fingerprint
    reg = CodebookRegistry([tmp_path])
    assert reg.for_fingerprint("test-model-cb1").digest == cb.digest and reg.by_digest(cb.digest) is not None
    assert reg.for_fingerprint("other") is None
    codebooks.register(cb)
    kv = kv_like(shape=(2, 2, 64, 2, 16), seed=99)
    c = CacheGenCodec(2).bind("test-model-cb1")
    assert c.codebook is cb and len(c.params()) == 18
    with_cb = c.encode(kv)
    without = CacheGenCodec(2).encode(kv)
    assert len(with_cb) < len(without)
    a, b = decode(c, with_cb, kv), decode(CacheGenCodec(2), without, kv)
    assert torch.equal(a, b)  # same quantization, different tables
    # an unbound model falls back to per-chunk tables
    assert CacheGenCodec(2).bind("unknown-model").codebook is None


def test_unknown_codebook_is_a_codec_error():
    with pytest.raises(CodecError, match="codebook"):
        codec_from_params("cachegen", bytes([1, 2]) + bytes(16))


def test_codebook_layout_mismatch_is_an_error():
    cb = _codebook("test-model-cb2", [kv_like(shape=(2, 2, 32, 2, 16))])
    with pytest.raises(CodecError, match="layers"):
        CacheGenCodec(2, cb).encode(kv_like(shape=(3, 2, 32, 2, 16)))


def test_corrupt_codebook_file_is_rejected(tmp_path):
    cb = _codebook("test-model-cb3", [kv_like(shape=(1, 2, 32, 1, 16))])
    raw = bytearray(cb.to_bytes())
    raw[40] ^= 0xFF
    with pytest.raises(CodecError):
        Codebook.from_bytes(bytes(raw))
    (tmp_path / "bad.kvcb").write_bytes(b"garbage")
    assert CodebookRegistry([tmp_path]).for_fingerprint("x") is None  # skipped, not raised


@pytest.mark.parametrize("params", [b"", b"\x01", b"\x02\x02", b"\x01\x09", bytes(5)])
def test_bad_params(params):
    with pytest.raises(CodecError):
        codec_from_params("cachegen", params)


def test_bad_levels_and_inputs():
    with pytest.raises(CodecError):
        make_codec("cachegen", 7)
    with pytest.raises(CodecError, match="non-finite"):
        CacheGenCodec(2).encode(torch.full(SHAPE, float("nan")))
    with pytest.raises(CodecError):
        CacheGenCodec(2).encode(torch.zeros(2, 3, 4))


def test_all_zero_and_constant_chunks():
    c = CacheGenCodec(2)
    zeros = torch.zeros(SHAPE)
    assert torch.equal(decode(c, c.encode(zeros), zeros), zeros)
    const = torch.full(SHAPE, 3.25)
    out = decode(c, c.encode(const), const)
    assert ((out - const).abs() <= 3.25 * LEVELS[2].alpha_v / 2 * 1.01).all()  # step = alpha * rms


def test_output_shape_must_match():
    kv = kv_like()
    c = CacheGenCodec(2)
    p = c.encode(kv)
    with pytest.raises(CodecError, match="output wants"):
        c.decode(memoryview(p), torch.empty(3, 2, 41, 2, 24))


def test_normalize_freqs_properties():
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 1000, size=(50, 127)) * (rng.random((50, 127)) < 0.3)
    counts[0] = 0
    for floor in (True, False):
        f = normalize_freqs(counts, floor)
        assert (f.sum(axis=1) == TOTAL).all()
        if floor:
            assert (f >= 1).all()
        else:
            assert ((f > 0) == (counts > 0))[1:].all()
        CodingTables.from_freqs(f)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_value_tables_round_like_torch(dtype):
    """The numba value tables (symbol -> output bits) equal torch's rounding of (s - M) * step, over step
    sizes from float16's subnormal range to beyond its overflow."""
    from codec.cachegen import _OUT_BITS, dequantize_values

    rng = np.random.default_rng(1)
    steps = np.concatenate([2.0 ** rng.uniform(-30, 20, 3000), [2.0**-24, 2.0**-25, 3 * 2.0**-26, 65504 / 63, 1e-40]])
    bits = ((steps.astype(np.float32).view(np.uint32) + 0x8000) >> 16).astype(np.uint16)  # bfloat16 steps
    level = LEVELS[2]
    got = dequantize_values(bits, level, dtype).copy()
    step = torch.from_numpy(_bf16_to_f32(bits).copy())
    q = torch.arange(level.alphabet, dtype=torch.float32) - level.m
    want = (q[None, :] * step[:, None]).to(dtype).view(_OUT_BITS[dtype][0]).numpy().view(got.dtype)
    assert np.array_equal(got, want)


def test_value_tables_kept_between_calls_follow_every_step_change():
    """The per-thread value tables are rebuilt only where a step changed: a sequence of calls that
    changes some steps, alternates output dtypes and levels (more than are kept) and returns to earlier
    ones gives what a table built from scratch gives, every time."""
    from codec.cachegen import _OUT_BITS, dequantize_values

    rng = np.random.default_rng(3)
    base = ((2.0 ** rng.uniform(-12, 4, 500)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)

    def fresh(bits, level, dtype):
        step = torch.from_numpy(_bf16_to_f32(bits).copy())
        q = torch.arange(level.alphabet, dtype=torch.float32) - level.m
        return (q[None, :] * step[:, None]).to(dtype).view(_OUT_BITS[dtype][0]).numpy()

    bits = base.copy()
    calls = [(2, torch.float16), (2, torch.float16), (2, torch.float32), (3, torch.float16), (2, torch.float16),
             (1, torch.bfloat16), (2, torch.float16), (2, torch.float32)]
    for i, (lv, dtype) in enumerate(calls):
        if i % 2:
            changed = rng.choice(bits.size, 7, replace=False)
            bits[changed] = base[changed] + rng.integers(1, 50, 7).astype(np.uint16)
        got = dequantize_values(bits, LEVELS[lv], dtype)
        assert np.array_equal(got, fresh(bits, LEVELS[lv], dtype).view(got.dtype)), (i, lv, dtype)
    assert np.array_equal(dequantize_values(base, LEVELS[2], torch.float16),
                          fresh(base, LEVELS[2], torch.float16).view(np.uint16))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_encode_like_their_float32_values(dtype):
    """16-bit KV is read as bits (no conversion pass): the payload equals the float32 copy's."""
    kv = kv_like(seed=4, dtype=dtype)
    for c in (CacheGenCodec(2), CacheGenCodec(3)):
        assert c.encode(kv) == c.encode(kv.float())


def test_sensitivity_sets_the_steps_of_a_codebook():
    shape = (2, 2, 64, 2, 16)
    train = [kv_like(shape=shape, seed=s) for s in range(3)]
    n = 2 * 2 * 32
    w = np.full(n, (LEVELS[2].budget / 0.6) ** 2)  # level 2 steps of 0.6 (the values are ~N(0, 1))
    w[5] *= 100  # layer 0, K, channel 5: 100x as sensitive -> a 10x finer step
    cb = profile_kv("test-model-sens", train, w)
    codebooks.register(cb)
    assert sorted(cb.step_bits) == sorted(LEVELS)
    for lv in LEVELS:
        base = cb.base_steps(lv)
        assert base[5] == pytest.approx(base[6] / 10, rel=0.01)
    kv = kv_like(shape=shape, seed=7)
    codec = CacheGenCodec(2, cb)
    payload = codec.encode(kv)
    out = decode(codec, payload, kv)
    step = _bf16_to_f32(np.frombuffer(payload, dtype="<u2", count=n, offset=18)).reshape(2 * 2, 32)
    want = np.maximum(cb.base_steps(2).reshape(4, 32),
                      kv.reshape(2, 2, 64, 32).abs().amax(dim=2).reshape(4, 32).numpy() / LEVELS[2].m)
    assert np.allclose(step, want, rtol=2**-7)  # the codebook's step, or the floor that fits the alphabet
    err = (out - kv).reshape(2, 2, 64, 32).abs().amax(dim=2).reshape(4, 32).numpy()
    assert (err <= step / 2 * (1 + 1e-6)).all()
    assert err[0, 5] < err[0, 6] / 4  # the sensitive channel is coded finer
    # the codebook's steps survive its file format
    again = Codebook.from_bytes(cb.to_bytes())
    assert all(np.array_equal(again.step_bits[lv], cb.step_bits[lv]) for lv in LEVELS)


def _version1_bytes(cb: Codebook) -> bytes:
    """The same codebook in file format version 1 (no steps), as written before steps existed."""
    import struct

    import xxhash

    fp = cb.fingerprint.encode()
    parts = [struct.pack("<4sHBHIB", b"KVCB", 1, 15, cb.layers, cb.channels, len(cb.freqs)), bytes([len(fp)]), fp]
    for lv in sorted(cb.freqs):
        parts += [struct.pack("<BH", lv, cb.freqs[lv].shape[1]), cb.freqs[lv].astype("<u2").tobytes()]
    body = b"".join(parts)
    return body + struct.pack("<Q", xxhash.xxh3_64_intdigest(body))


def test_version1_codebook_still_loads_and_codes_with_layer_steps():
    shape = (2, 2, 32, 2, 16)
    train = [kv_like(shape=shape, seed=s) for s in range(2)]
    plain = _codebook("test-model-v1", train)  # no sensitivity: no steps
    old = Codebook.from_bytes(_version1_bytes(plain))
    assert old.step_bits == {} and old.base_steps(2) is None
    assert all(np.array_equal(old.freqs[lv], plain.freqs[lv]) for lv in LEVELS)
    kv = kv_like(shape=shape, seed=3)
    a, b = CacheGenCodec(2, old).encode(kv), CacheGenCodec(2).encode(kv)
    # the same steps as the codebook-less path (the layer-RMS rule)
    n = 2 * 2 * 32
    assert np.array_equal(np.frombuffer(a, "<u2", n, 18), np.frombuffer(b, "<u2", n, 18))


def test_bad_sensitivity_and_steps_are_refused():
    shape = (1, 2, 32, 1, 16)
    train = [kv_like(shape=shape)]
    with pytest.raises(CodecError, match="sensitivity"):
        profile_kv("m", train, np.ones(7))
    for bad in (np.zeros(32), np.full(32, np.nan), -np.ones(32)):
        with pytest.raises(CodecError, match="sensitivity"):
            profile_kv("m", train, bad)
    cb = profile_kv("test-model-badsteps", train, np.ones(32))
    raw = bytearray(cb.to_bytes()[:-8])
    # the level-1 steps are the last 64 bytes before level 2's header; make one of them +infinity
    level1_end = raw.index(bytes([2]) + (2 * LEVELS[2].m + 1).to_bytes(2, "little") + b"\x01")
    raw[level1_end - 2 : level1_end] = np.array([0x7F80], dtype="<u2").tobytes()
    import struct

    import xxhash

    with pytest.raises(CodecError, match="steps"):
        Codebook.from_bytes(bytes(raw) + struct.pack("<Q", xxhash.xxh3_64_intdigest(bytes(raw))))


def _with_sink(shape=(3, 2, 64, 2, 16), seed=0, dtype=torch.float32, token=0):
    """KV whose token `token` has keys at 0.3 of the others' norm in every layer (a SmolLM2-like sink)."""
    kv = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    kv[:, :, token] *= 0.3
    kv[:, 1, token] += 0.01 * torch.arange(shape[3] * shape[4]).reshape(shape[3], shape[4])  # distinct values
    return kv.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_sink_token_is_kept_at_16_bits(dtype):
    kv = _with_sink(dtype=dtype, token=5)
    codec = CacheGenCodec(1)
    payload = codec.encode(kv)
    assert payload[6] & 2  # flags: sink tokens
    out = decode(codec, payload, kv)
    want = kv[:, :, 5].to(torch.float16).to(dtype) if dtype == torch.float32 else kv[:, :, 5]
    assert torch.equal(out[:, :, 5], want)
    others = torch.cat([out[:, :, :5], out[:, :, 6:]], dim=2).float()
    ref = torch.cat([kv[:, :, :5], kv[:, :, 6:]], dim=2).float()
    assert (others - ref).abs().max() > 1e-3  # the rest is quantized coarsely, as before
    # a chunk without a sink carries no sink section
    plain = torch.randn(3, 2, 64, 2, 16, generator=torch.Generator().manual_seed(1))
    assert not codec.encode(plain)[6] & 2


def test_sink_rule():
    from codec.cachegen_quant import MAX_SINKS, sink_tokens

    layers, n_tok = 4, 64
    norms = np.ones((layers, 2, n_tok))
    norms[:, 0, [3, 9]] = 0.4
    norms[0, 0, 20] = 0.01  # only the first layer: not a sink (layer 0 is left out)
    assert sink_tokens(norms.reshape(-1) ** 2, layers, n_tok).tolist() == [3, 9]
    norms[:, 0, :10] = np.linspace(0.1, 0.5, 10)[None, :]
    assert sink_tokens(norms.reshape(-1) ** 2, layers, n_tok).tolist() == list(range(MAX_SINKS))
    assert sink_tokens(norms[:, :, :8].reshape(-1) ** 2, layers, 8).size == 0  # too short to judge


def test_version1_payload_still_decodes_and_refuses_sinks():
    kv = torch.randn(3, 2, 64, 2, 16, generator=torch.Generator().manual_seed(2))
    codec = CacheGenCodec(2)
    v2 = bytearray(codec.encode(kv))
    assert v2[4] == 2 and not v2[6] & 2
    v1 = bytearray(v2)
    v1[4] = 1  # a version-1 payload is the same bytes when there is no sink section
    assert torch.equal(decode(codec, bytes(v1), kv), decode(codec, bytes(v2), kv))
    v1[6] |= 2
    with pytest.raises(CodecError, match="flags"):
        decode(codec, bytes(v1), kv)
    v3 = bytearray(v2)
    v3[4] = 3
    with pytest.raises(CodecError, match="version 3"):
        decode(codec, bytes(v3), kv)


def test_bad_sink_sections_are_codec_errors():
    kv = _with_sink(token=0)
    codec = CacheGenCodec(2)
    payload = bytearray(codec.encode(kv))
    n_tab = 3 * 2 * 32
    blob_at = 18 + 2 * n_tab
    (blob_len,) = np.frombuffer(payload, "<u4", 1, blob_at)
    sink_at = blob_at + 4 + int(blob_len)
    assert payload[sink_at] == 1 and payload[sink_at + 1] == 1  # one token, float16
    for at, value in ((sink_at, 0), (sink_at + 1, 9), (sink_at + 2, 64)):
        bad = bytearray(payload)
        bad[at] = value
        with pytest.raises(CodecError, match="sink"):
            decode(codec, bytes(bad), kv)
    with pytest.raises(CodecError):
        decode(codec, bytes(payload[: sink_at + 10]), kv)


@pytest.mark.parametrize("with_codebook", [False, True])
def test_reconstruct_is_what_the_codec_decodes(with_codebook):
    """`reconstruct` (what profiling calibrates on) equals a float32 decode, sink token and all."""
    from codec.cachegen_quant import reconstruct

    shape = (3, 2, 64, 2, 16)
    kv = _with_sink(shape=shape, token=0)
    cb = profile_kv("test-model-reconstruct", [kv_like(shape=shape, seed=s) for s in range(2)],
                    np.linspace(1.0, 50.0, 3 * 2 * 32)) if with_codebook else None
    if cb is not None:
        codebooks.register(cb)
    for lv in (1, 2):
        codec = CacheGenCodec(lv, cb)
        payload = codec.encode(kv)
        assert payload[6] & 2  # the chunk has a sink token
        out = decode(codec, payload, kv)
        assert torch.equal(reconstruct(kv, LEVELS[lv], None if cb is None else cb.base_steps(lv)), out)


def test_every_level_has_a_nominal_size_in_bits():
    from codec.cachegen import NOMINAL_BITS

    assert set(NOMINAL_BITS) == set(LEVELS)
    sizes = [CacheGenCodec(level).nominal_bits(16) for level in sorted(LEVELS)]
    assert sizes == sorted(sizes) and sizes[-1] < 8  # finer levels are larger, all well under int8's

"""Golden tables for the NVFP4 format: E2M1 rounding, codes, packing, FP8 codes,
global scales. Checked against torch's float8 conversion and compressed-tensors."""

import pytest
import torch

from scalesweep_vllm import nvfp4

E2M1 = torch.tensor(nvfp4.E2M1_VALUES)


def brute_force_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Independent RNE: nearest grid point by distance, ties to the even index."""
    a = x.abs().double().clamp(max=6.0)
    dist = (a[:, None] - E2M1.double()[None, :]).abs()
    best = dist.min(dim=1, keepdim=True).values
    tied = dist == best
    idx = torch.arange(8)
    # among the tied indices prefer the even one (there are at most two)
    score = torch.where(tied, idx % 2, 10)  # even index -> 0
    choice = torch.argmin(score * 16 + idx, dim=1)  # even first, then smaller
    return torch.where(torch.signbit(x), -E2M1[choice], E2M1[choice])


def test_e2m1_tie_table():
    cases = {
        0.0: 0.0,
        0.25: 0.0,
        0.2500001: 0.5,
        0.7499999: 0.5,
        0.75: 1.0,
        1.25: 1.0,
        1.2500001: 1.5,
        1.75: 2.0,
        2.5: 2.0,
        2.5000002: 3.0,
        3.4999998: 3.0,
        3.5: 4.0,
        5.0: 4.0,
        5.0000005: 6.0,
        6.0: 6.0,
        7.0: 6.0,
        1e30: 6.0,
    }
    x = torch.tensor(list(cases), dtype=torch.float32)
    want = torch.tensor(list(cases.values()), dtype=torch.float32)
    assert torch.equal(nvfp4.round_e2m1(x), want)
    assert torch.equal(nvfp4.round_e2m1(-x), -want)


def test_e2m1_rounding_matches_brute_force_dense():
    g = torch.Generator().manual_seed(0)
    grid = torch.arange(0, 7.0, 1 / 64)  # hits every midpoint exactly
    x = torch.cat([grid, -grid, torch.randn(200_000, generator=g) * 3, torch.tensor([-0.0])])
    assert torch.equal(nvfp4.round_e2m1(x), brute_force_e2m1(x))
    # the result keeps its dtype
    for dt in (torch.bfloat16, torch.float16):
        xd = x.to(dt)
        assert nvfp4.round_e2m1(xd).dtype == dt
        assert torch.equal(nvfp4.round_e2m1(xd).float(), brute_force_e2m1(xd.float()))


def test_e2m1_codes_golden():
    codes = torch.arange(16, dtype=torch.uint8)
    values = nvfp4.decode_e2m1(codes)
    want = [0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6]
    assert values.tolist() == want
    assert torch.signbit(values[8])  # code 0b1000 is -0.0
    assert torch.equal(nvfp4.encode_e2m1(values), codes)
    # sign bit comes from x: small negatives encode as -0 like compressed-tensors
    assert nvfp4.encode_e2m1(torch.tensor([-0.1, 0.1, -0.0])).tolist() == [0b1000, 0, 0b1000]


def test_pack_nibble_order():
    codes = torch.tensor([[0b0001, 0b0010, 0b1111, 0b0111]], dtype=torch.uint8)
    packed = nvfp4.pack_fp4(codes)
    assert packed.tolist() == [[0b0010_0001, 0b0111_1111]]  # even element in the low nibble
    assert torch.equal(nvfp4.unpack_fp4(packed), codes)
    with pytest.raises(ValueError, match="even"):
        nvfp4.pack_fp4(torch.zeros(1, 3, dtype=torch.uint8))
    with pytest.raises(TypeError):
        nvfp4.unpack_fp4(torch.zeros(2, dtype=torch.int32))


def test_pack_matches_compressed_tensors():
    from compressed_tensors.compressors.nvfp4.helpers import (
        pack_fp4_to_uint8,
        unpack_fp4_from_uint8,
    )

    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (64, 96), generator=g, dtype=torch.uint8)
    values = nvfp4.decode_e2m1(codes)  # includes -0.0 for code 8
    ours = nvfp4.pack_fp4(nvfp4.encode_e2m1(values))
    theirs = pack_fp4_to_uint8(values)
    assert torch.equal(ours, theirs)
    back = unpack_fp4_from_uint8(ours, 64, 96, dtype=torch.float32)
    assert torch.equal(back, values)
    assert torch.equal(nvfp4.unpack_fp4(ours), codes)


def test_fp8_values_table():
    v = nvfp4.fp8_values()
    assert v.shape == (127,)
    assert v[0] == 0 and v[1] == 2.0**-9 and v[7] == 7 * 2.0**-9 and v[8] == 2.0**-6
    assert v[126] == 448.0 and v[120] == 256.0 and v[56] == 1.0
    assert bool((v[1:] > v[:-1]).all())  # codes are ordered like their values


def test_fp8_rne_code_matches_torch_conversion():
    # every 61st fp32 bit pattern between 0 and 480, all codes and all midpoints
    top = torch.tensor(480.0).view(torch.int32).item()
    bits = torch.arange(0, top, 61, dtype=torch.int32)
    v = nvfp4.fp8_values()
    t = torch.cat([bits.view(torch.float32), v, (v[1:] + v[:-1]) / 2, torch.tensor([1e30])])
    want = t.clamp(0, 448).to(torch.float8_e4m3fn).view(torch.uint8).to(torch.int32)
    assert torch.equal(nvfp4.fp8_rne_code(t), want)


def test_fp8_ceil_code():
    v = nvfp4.fp8_values()
    g = torch.Generator().manual_seed(2)
    t = torch.cat(
        [
            v[1:],
            (v[1:] + v[:-1]) / 2,
            torch.rand(100_000, generator=g) * 450,
            torch.rand(10_000, generator=g) * 2.0**-5,
            torch.tensor([2.0**-9 + 2.0**-30]),
        ]
    )
    c = nvfp4.fp8_ceil_code(t).long()
    tc = t.clamp(max=448)
    assert bool(((v[c] >= tc) | (c == 126)).all())
    assert bool(((c == 1) | (v[c - 1] < tc)).all())
    assert nvfp4.fp8_ceil_code(torch.tensor([2.0**-9 + 2.0**-30])).item() == 2


def test_global_scale_conventions():
    from compressed_tensors.quantization.utils.helpers import generate_gparam

    amax = torch.tensor(3.7)
    assert nvfp4.global_scale(amax).item() == pytest.approx(256 * 6 / 3.7, rel=1e-7)
    ct = generate_gparam(-amax.reshape(1), amax.reshape(1))
    assert torch.equal(nvfp4.global_scale(amax, "compressed-tensors"), ct)
    assert nvfp4.global_scale(0.0).item() == 1.0
    assert nvfp4.global_scale(torch.tensor([1.0, -5.0])).item() == pytest.approx(256 * 6 / 5)
    with pytest.raises(ValueError, match="convention"):
        nvfp4.global_scale(1.0, "bogus")

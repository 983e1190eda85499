"""The compiled ops against the pure-PyTorch reference, plus opcheck, gradcheck, compile and properties.

Every comparison runs the compiled operator (``torch.ops.fastadv.*`` through ``fastadv.ops``) and the
reference (``fastadv.ops.reference``) on the same inputs. The reference is itself checked against
hand-written formulas in ``test_reference_*``.
"""

import pytest
import torch
import torch.nn.functional as F

import fastadv.ops as ops
from fastadv.ops import reference

native = pytest.mark.skipif(not ops.has_native("cpu"), reason="compiled kernels are not loaded")

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Both sides compute in float32 (float64 for double) and round once, so the results agree to rounding.
ATOL = {torch.float32: 2e-6, torch.float64: 1e-12, torch.float16: 1e-3, torch.bfloat16: 8e-3}
SHAPES = [(0, 3, 32, 32), (1, 3, 32, 32), (5, 3, 32, 32), (3, 1, 13, 17), (2, 3, 224, 224)]


def make(shape, dtype, device, layout="contiguous", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g, dtype=torch.float64)
    grad = torch.randn(shape, generator=g, dtype=torch.float64)
    delta = (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1) * 0.05
    grad[..., :1] = 0.0  # exercise sign(0)
    out = []
    for t in (delta, grad, x):
        t = t.to(device=device, dtype=dtype)
        if layout == "channels_last" and t.dim() == 4:
            t = t.contiguous(memory_format=torch.channels_last)
        elif layout == "strided":
            t = torch.stack([t, t], dim=-1)[..., 0]  # non-contiguous view with the same values
        out.append(t)
    if layout == "mixed" and shape[0] > 0:
        out[0] = out[0].contiguous(memory_format=torch.channels_last)
        out[2] = out[2].transpose(-1, -2).contiguous().transpose(-1, -2)
    return out


def eps_forms(shape, device, norm):
    B = shape[0]
    g = torch.Generator().manual_seed(1)
    forms = {"float": 8 / 255, "per_sample": torch.rand(B, generator=g).to(device) * 0.05 + 0.01}
    if norm == "linf":
        forms["per_pixel"] = (torch.rand((B, 1) + shape[2:], generator=g) * 0.05).to(device)
        forms["full_map"] = (torch.rand(shape, generator=g) * 0.05).to(device)
    return forms


# --- the reference itself, against hand-written formulas ---------------------------------------------


def test_reference_linf_matches_textbook_loop():
    delta, grad, x = make((4, 3, 8, 8), torch.float64, "cpu")
    eps, alpha = 0.03, 0.01
    expect = delta + alpha * grad.sign()
    expect = torch.max(torch.min(expect, torch.full_like(x, eps)), torch.full_like(x, -eps))
    expect = torch.clamp(x + expect, 0, 1) - x
    torch.testing.assert_close(reference.pgd_step(delta, grad, x, eps=eps, alpha=alpha), expect)


def test_reference_l2_matches_per_sample_loop():
    delta, grad, x = make((3, 3, 5, 5), torch.float64, "cpu")
    eps, alpha = 0.5, 0.2
    out = reference.pgd_step(delta, grad, x, eps=eps, alpha=alpha, norm="l2")
    for b in range(3):
        d = delta[b] + alpha * grad[b] / grad[b].norm()
        if d.norm() > eps:
            d = d * eps / d.norm()
        torch.testing.assert_close(out[b], (x[b] + d).clamp(0, 1) - x[b])


def test_reference_prompt_pad_matches_construction():
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    p = torch.randn(3, 16, 16, dtype=torch.float64)
    out = reference.prompt_pad(x, p, out_size=(16, 16), inner_size=(12, 12), activation="tanh")
    img = F.interpolate(x, size=(12, 12), mode="bilinear", align_corners=False)
    expect = F.pad(img, (2, 2, 2, 2))  # offset (16 - 12 + 1) // 2 = 2
    border = torch.ones(16, 16, dtype=torch.bool)
    border[2:14, 2:14] = False
    expect = torch.where(border, torch.tanh(p), expect)
    torch.testing.assert_close(out, expect)


# --- compiled op vs reference --------------------------------------------------------------------------


def _close(a, b, dtype):
    torch.testing.assert_close(a.double(), b.double(), atol=ATOL[dtype], rtol=0)


@native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_step_matches_reference(device, dtype, shape, norm):
    if shape[-1] == 224 and dtype in (torch.float64,):
        pytest.skip("covered at float32; keeps the suite short")
    delta, grad, x = make(shape, dtype, device)
    for name, eps in eps_forms(shape, device, norm).items():
        for alpha in (2 / 255, eps if isinstance(eps, torch.Tensor) and norm == "l2" else 0.01):
            got = ops.pgd_step(delta, grad, x, eps=eps, alpha=alpha, norm=norm)
            with ops.reference_ops():
                want = ops.pgd_step(delta, grad, x, eps=eps, alpha=alpha, norm=norm)
            assert got.dtype == dtype and got.shape == x.shape
            _close(got, want, dtype)


@native
@pytest.mark.parametrize("layout", ["channels_last", "strided", "mixed"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_pgd_step_layouts(device, layout, norm, dtype):
    delta, grad, x = make((5, 3, 12, 10), dtype, device, layout)
    for eps in eps_forms(tuple(x.shape), device, norm).values():
        want = reference.pgd_step(delta, grad, x, eps=eps, alpha=0.01, norm=norm)
        got = ops.pgd_step(delta, grad, x, eps=eps, alpha=0.01, norm=norm)
        _close(got, want, dtype)
        # out-of-place keeps delta's memory format (what the fake kernel promises)
        assert got.stride() == torch.empty_like(delta).stride()
        d2 = delta.clone()
        assert ops.pgd_step_(d2, grad, x, eps=eps, alpha=0.01, norm=norm) is d2
        _close(d2, want, dtype)
        if layout != "strided":
            assert d2.stride() == delta.stride()


@native
def test_inplace_on_non_contiguous_view_writes_through(device):
    delta, grad, x = make((3, 3, 8, 8), torch.float32, device)
    base = torch.zeros(3, 3, 8, 16, device=device)
    view = base[..., ::2]
    view.copy_(delta)
    want = reference.pgd_step(delta, grad, x, eps=0.03, alpha=0.01)
    ops.pgd_step_(view, grad, x, eps=0.03, alpha=0.01)
    torch.testing.assert_close(base[..., ::2], want)
    assert base[..., 1::2].abs().sum() == 0


@native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(0, 3, 8, 8), (1, 3, 32, 32), (7, 3, 9, 11), (2, 3, 224, 224)])
@pytest.mark.parametrize("mask_shape", ["full", "per_pixel", "uint8"])
def test_masked_step_matches_reference(device, dtype, shape, mask_shape):
    delta, grad, x = make(shape, dtype, device)
    g = torch.Generator().manual_seed(3)
    full = torch.rand(shape, generator=g) > 0.5
    mask = {"full": full, "per_pixel": full[:, :1], "uint8": full.to(torch.uint8)}[mask_shape].to(device)
    d1, d2 = delta.clone(), delta.clone()
    ops.masked_pgd_step_(d1, grad, x, mask, eps_high=8 / 255, eps_low=7 / 255, alpha=2 / 255)
    reference.masked_pgd_step_(d2, grad, x, mask, eps_high=8 / 255, eps_low=7 / 255, alpha=2 / 255)
    _close(d1, d2, dtype)


@native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("shape", [(0, 3, 8, 8), (1, 3, 32, 32), (6, 3, 17, 9)])
def test_random_init_matches_reference_given_generator(device, dtype, norm, shape):
    x = make(shape, dtype, device)[2]
    for eps in eps_forms(shape, device, norm).values():
        g1 = torch.Generator(device=device).manual_seed(7)
        g2 = torch.Generator(device=device).manual_seed(7)
        got = ops.random_init(x, eps=eps, norm=norm, generator=g1)
        want = reference.random_init(x, eps=eps, norm=norm, generator=g2)
        _close(got, want, dtype)


@native
def test_random_init_channels_last_draws_in_logical_order(device):
    x = torch.rand(4, 3, 8, 8, device=device)
    xc = x.contiguous(memory_format=torch.channels_last)
    a = ops.random_init(x, eps=0.1, generator=torch.Generator(device=device).manual_seed(1))
    b = ops.random_init(xc, eps=0.1, generator=torch.Generator(device=device).manual_seed(1))
    torch.testing.assert_close(a, b)
    assert b.is_contiguous(memory_format=torch.channels_last)


def test_random_init_distribution():
    x = torch.full((2000, 1, 4, 4), 0.5)
    d = ops.random_init(x, eps=0.1, generator=torch.Generator().manual_seed(0))
    assert d.abs().max() <= 0.1 and abs(d.mean().item()) < 2e-3  # uniform on [-0.1, 0.1): mean 0
    assert abs(d.std().item() - 0.1 / 3 ** 0.5) < 1e-3
    # uniform in the 16-dim L2 ball: P(|d| <= r eps) = r^16
    d2 = ops.random_init(x, eps=0.1, norm="l2", generator=torch.Generator().manual_seed(0))
    radius = d2.flatten(1).norm(dim=1) / 0.1
    assert radius.max() <= 1 + 1e-6
    assert abs((radius <= 0.9).float().mean().item() - 0.9 ** 16) < 0.03


PAD_CASES = [
    dict(out_size=224, inner_size=192, activation="tanh", mode="replace"),
    dict(out_size=224, inner_size=32, activation="sigmoid", mode="replace", mean=[0.485, 0.456, 0.406],
         std=[0.229, 0.224, 0.225]),
    dict(out_size=(40, 36), inner_size=(20, 30), activation="tanh", mode="replace", mean=[0.4, 0.5, 0.6],
         std=[0.2, 0.25, 0.3], normalize="image"),
    dict(out_size=48, inner_size=28, activation="none", mode="add", mean=[0.4, 0.5, 0.6], std=[0.2, 0.25, 0.3],
         normalize="image"),
    dict(out_size=48, inner_size=48, activation="sigmoid", mode="replace"),
    dict(out_size=20, inner_size=6, activation="none", mode="add"),
]


@native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(len(PAD_CASES)))
@pytest.mark.parametrize("batch", [0, 1, 3])
def test_prompt_pad_matches_reference(device, dtype, case, batch):
    kw = PAD_CASES[case]
    out = ops._args.pair("t", "o", kw["out_size"])
    g = torch.Generator().manual_seed(case)
    x = torch.rand(batch, 3, 32, 32, generator=g).to(device, dtype)
    p = torch.randn(3, *out, generator=g).to(device, dtype)
    got = ops.prompt_pad(x, p, **kw)
    want = reference.prompt_pad(x, p, **{**kw, "out_size": out, "inner_size": ops._args.pair("t", "i", kw["inner_size"])})
    assert got.shape == (batch, 3, *out) and got.dtype == dtype
    tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(got.double(), want.double(), atol=tol, rtol=tol)


@native
@pytest.mark.parametrize("case", range(len(PAD_CASES)))
def test_prompt_pad_gradients_match_reference(device, case):
    kw = PAD_CASES[case]
    out = ops._args.pair("t", "o", kw["out_size"])
    ref_kw = {**kw, "out_size": out, "inner_size": ops._args.pair("t", "i", kw["inner_size"])}
    x = torch.rand(3, 3, 16, 16, device=device, requires_grad=True)
    p = torch.randn(3, *out, device=device, requires_grad=True)
    go = torch.randn(3, 3, *out, device=device)
    got = torch.autograd.grad(ops.prompt_pad(x, p, **kw), (x, p), go)
    want = torch.autograd.grad(reference.prompt_pad(x, p, **ref_kw), (x, p), go)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


@native
def test_prompt_pad_strided_and_channels_last_input(device):
    x = torch.rand(2, 3, 20, 24, device=device)
    p = torch.randn(3, 32, 32, device=device)
    want = reference.prompt_pad(x, p, out_size=(32, 32), inner_size=(24, 24))
    for xv in (x.contiguous(memory_format=torch.channels_last), torch.stack([x, x], -1)[..., 0]):
        torch.testing.assert_close(ops.prompt_pad(xv, p, out_size=32, inner_size=24), want, atol=1e-6, rtol=1e-6)


@native
@pytest.mark.parametrize("case", [0, 2, 3, 5])
def test_prompt_pad_gradcheck_float64(device, case):
    kw = {**PAD_CASES[case]}
    small = {0: (12, 9), 2: (14, 12), 3: (12, 6), 5: (10, 4)}[case]
    kw["out_size"], kw["inner_size"] = small
    x = torch.rand(2, 3, 5, 6, dtype=torch.float64, device=device, requires_grad=True)
    p = torch.randn(3, small[0], small[0], dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: ops.prompt_pad(a, b, **kw), (x, p))
    # each input alone, so the backward's need_x / need_prompt branches are exercised
    assert torch.autograd.gradcheck(lambda a: ops.prompt_pad(a, p.detach(), **kw), (x,))
    assert torch.autograd.gradcheck(lambda b: ops.prompt_pad(x.detach(), b, **kw), (p,))


@native
def test_half_precision_error_within_twice_torch_own(device):
    """flash-attention's rule: our fp16 error vs an fp64 reference is at most ~2x PyTorch's own fp16 error."""
    delta, grad, x = make((8, 3, 32, 32), torch.float64, device)
    exact = reference.pgd_step(delta, grad, x, eps=0.5, alpha=0.3, norm="l2")
    h = [t.half() for t in (delta, grad, x)]
    ours = ops.pgd_step(*h, eps=0.5, alpha=0.3, norm="l2").double()
    d, g, xx = h  # PyTorch's own fp16 ops, same formula
    gn = g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    t = d + 0.3 * g / gn
    t = t * torch.clamp(0.5 / t.flatten(1).norm(dim=1).view(-1, 1, 1, 1), max=1)
    torch_own = ((xx + t).clamp(0, 1) - xx).double()
    assert (ours - exact).abs().max() <= 2 * (torch_own - exact).abs().max() + 1e-4


# --- opcheck, compile ------------------------------------------------------------------------------------


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_all_ops(device, dtype):
    delta, grad, x = make((3, 3, 8, 8), dtype, device)
    eps_t = torch.rand(3, dtype=dtype, device=device) * 0.05
    mask = torch.rand(3, 1, 8, 8, device=device) > 0.5
    fa = torch.ops.fastadv
    cases = [
        (fa.pgd_step.default, (delta, grad, x, 0.03, 0.01, None, None, "linf", 0.0, 1.0)),
        (fa.pgd_step.default, (delta, grad, x, 0.0, 0.01, eps_t, None, "l2", 0.0, 1.0)),
        (fa.pgd_step_.default, (delta.clone(), grad, x, 0.03, 0.01, None, None, "linf", 0.0, 1.0)),
        (fa.pgd_step_.default, (delta.clone(), grad, x, 0.3, 0.1, None, None, "l2", 0.0, 1.0)),
        (fa.masked_pgd_step_.default, (delta.clone(), grad, x, mask, 8 / 255, 7 / 255, 2 / 255, None, 0.0, 1.0)),
        (fa.random_init.default, (x, 0.0, None, "linf", 0.0, 1.0, None)),
    ]
    p = torch.randn(3, 16, 16, dtype=dtype, device=device, requires_grad=True)
    xg = x.clone().requires_grad_(True)
    cases += [
        (fa.prompt_pad.default, (xg, p, [16, 16], [12, 12], "sigmoid", "replace", [0.5] * 3, [0.25] * 3, "canvas")),
        (fa.prompt_pad.default, (xg, p, [16, 16], [10, 10], "none", "add", None, None, "canvas")),
        (fa.prompt_pad_backward.default, (torch.randn(3, 3, 16, 16, dtype=dtype, device=device), x, p.detach(),
                                          [16, 16], [12, 12], "tanh", "replace", None, None, "canvas", True, True)),
    ]
    for op, args in cases:
        utils = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
        if op is fa.random_init.default:
            utils = ("test_schema", "test_faketensor")  # outputs are random: only metadata can be compared
        torch.library.opcheck(op, args, test_utils=utils)


@native
def test_random_init_opcheck_with_generator():
    x = torch.rand(2, 3, 4, 4)
    torch.library.opcheck(torch.ops.fastadv.random_init.default,
                          (x, 0.1, None, "l2", 0.0, 1.0, torch.Generator().manual_seed(0)),
                          test_utils=("test_schema", "test_faketensor"))


@native
def test_torch_compile_fullgraph():
    torch._dynamo.reset()

    def attack_step(delta, grad, x, mask, p):
        d = ops.pgd_step(delta, grad, x, eps=8 / 255, alpha=2 / 255)
        ops.pgd_step_(d, grad, x, eps=0.5, alpha=0.1, norm="l2")
        ops.masked_pgd_step_(d, grad, x, mask, eps_high=8 / 255, eps_low=7 / 255, alpha=2 / 255)
        canvas = ops.prompt_pad(x + d, p, out_size=24, inner_size=16)
        return d, canvas.sum()

    delta, grad, x = make((4, 3, 16, 16), torch.float32, "cpu")
    mask = torch.rand(4, 1, 16, 16) > 0.5
    p = torch.randn(3, 24, 24, requires_grad=True)
    compiled = torch.compile(attack_step, fullgraph=True, backend="aot_eager")
    d1, s1 = compiled(delta, grad, x, mask, p)
    d2, s2 = attack_step(delta, grad, x, mask, p)
    torch.testing.assert_close(d1, d2)
    torch.testing.assert_close(s1, s2)
    g1, = torch.autograd.grad(s1, p)
    g2, = torch.autograd.grad(s2, p)
    torch.testing.assert_close(g1, g2)


@native
@pytest.mark.slow
def test_torch_compile_inductor():
    torch._dynamo.reset()

    def step(delta, grad, x):
        return ops.pgd_step(delta, grad, x, eps=8 / 255, alpha=2 / 255) * 2

    delta, grad, x = make((2, 3, 8, 8), torch.float32, "cpu")
    torch.testing.assert_close(torch.compile(step, fullgraph=True)(delta, grad, x), step(delta, grad, x))


# --- properties ------------------------------------------------------------------------------------------

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=60, deadline=None)
@given(b=st.integers(0, 4), c=st.integers(1, 3), h=st.integers(1, 9), w=st.integers(1, 9),
       eps=st.floats(0, 1), alpha=st.floats(0, 2), lo=st.floats(-1, 0.5), width=st.floats(0, 2),
       norm=st.sampled_from(["linf", "l2"]), per_sample=st.booleans(), seed=st.integers(0, 2 ** 16),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_property_result_in_ball_and_box(b, c, h, w, eps, alpha, lo, width, norm, per_sample, seed, dtype):
    hi = lo + width
    g = torch.Generator().manual_seed(seed)
    x = (lo + torch.rand(b, c, h, w, generator=g, dtype=dtype) * width)
    delta = torch.randn(b, c, h, w, generator=g, dtype=dtype) * eps
    grad = torch.randn(b, c, h, w, generator=g, dtype=dtype) * 10 ** float(torch.randint(-8, 4, (1,), generator=g))
    e = torch.rand(b, generator=g, dtype=dtype) * eps if per_sample else eps
    out = ops.pgd_step(delta, grad, x, eps=e, alpha=alpha, norm=norm, lo=lo, hi=hi)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert torch.isfinite(out).all()
    assert ((x + out) >= lo - tol).all() and ((x + out) <= hi + tol).all()
    e_b = e if isinstance(e, torch.Tensor) else torch.full((b,), eps, dtype=dtype)
    if norm == "linf":
        assert (out.abs() <= e_b.view(-1, 1, 1, 1) + tol).all()
    else:
        assert (out.flatten(1).norm(dim=1) <= e_b * (1 + tol) + tol).all()
    init = ops.random_init(x, eps=e, norm=norm, lo=lo, hi=hi, generator=g)
    assert ((x + init) >= lo - tol).all() and ((x + init) <= hi + tol).all()


@settings(max_examples=40, deadline=None)
@given(b=st.integers(0, 3), h=st.integers(1, 8), seed=st.integers(0, 2 ** 16),
       eh=st.floats(0, 0.5), el=st.floats(0, 0.5))
def test_property_masked_step_respects_each_pixel_budget(b, h, seed, eh, el):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 3, h, h, generator=g)
    delta = torch.zeros_like(x)
    mask = torch.rand(b, 1, h, h, generator=g) > 0.5
    for _ in range(3):
        ops.masked_pgd_step_(delta, torch.randn(x.shape, generator=g), x, mask, eps_high=eh, eps_low=el, alpha=0.2)
    budget = torch.where(mask, torch.tensor(eh), torch.tensor(el)).expand_as(x)
    assert (delta.abs() <= budget + 1e-6).all()
    assert ((x + delta) >= 0).all() and ((x + delta) <= 1 + 1e-6).all()


# --- CUDA: the same kernels on a GPU when one is present ------------------------------------------------


@pytest.mark.cuda
@native
def test_cuda_kernels_registered_and_used():
    assert ops.has_native("cuda")
    delta, grad, x = make((64, 3, 224, 224), torch.float32, "cuda")
    torch.testing.assert_close(ops.pgd_step(delta, grad, x, eps=8 / 255, alpha=2 / 255),
                               reference.pgd_step(delta, grad, x, eps=8 / 255, alpha=2 / 255), atol=1e-6, rtol=0)


@pytest.mark.cuda
@native
def test_cuda_step_does_not_synchronise():
    delta, grad, x = make((8, 3, 32, 32), torch.float32, "cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        for norm in ("linf", "l2"):
            ops.pgd_step_(delta, grad, x, eps=0.03, alpha=0.01, norm=norm)
    finally:
        torch.cuda.set_sync_debug_mode("default")

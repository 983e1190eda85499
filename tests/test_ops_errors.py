"""Malformed calls: each raises ValueError or RuntimeError naming the offending argument, on the compiled path,
on direct ``torch.ops.fastadv`` calls, and on the reference path."""

import contextlib

import pytest
import torch

import fastadv.ops as ops

X = torch.rand(2, 3, 8, 8)
D = torch.zeros_like(X)
G = torch.randn_like(X)
P = torch.randn(3, 16, 16)
M = torch.rand(2, 1, 8, 8) > 0.5


def step(**kw):
    args = dict(delta=D, grad=G, x=X, eps=0.03, alpha=0.01)
    args.update(kw)
    return lambda: ops.pgd_step(**args)


def masked(**kw):
    args = dict(delta=D.clone(), grad=G, x=X, mask=M, eps_high=0.03, eps_low=0.02, alpha=0.01)
    args.update(kw)
    return lambda: ops.masked_pgd_step_(**{**args, "delta": args["delta"].clone()})


def pad(**kw):
    args = dict(x=X, prompt=P, out_size=16, inner_size=8)
    args.update(kw)
    return lambda: ops.prompt_pad(**args)


BAD_CALLS = {
    "delta wrong shape": (step(delta=torch.zeros(2, 3, 8, 7)), "delta"),
    "grad wrong shape": (step(grad=torch.zeros(3, 3, 8, 8)), "grad"),
    "delta wrong dtype": (step(delta=D.double()), "delta"),
    "x integer dtype": (step(x=X.to(torch.uint8), delta=D.to(torch.uint8), grad=G.to(torch.uint8)), "x"),
    "negative eps": (step(eps=-0.1), "eps"),
    "nan eps": (step(eps=float("nan")), "eps"),
    "negative alpha": (step(alpha=-1.0), "alpha"),
    "infinite alpha": (step(alpha=float("inf")), "alpha"),
    "negative per-sample eps": (step(eps=torch.tensor([0.1, -0.1])), "eps"),
    "nan per-pixel eps": (step(eps=torch.full((2, 1, 8, 8), float("nan"))), "eps"),
    "eps wrong shape": (step(eps=torch.rand(3)), "eps"),
    "eps integer tensor": (step(eps=torch.ones(2, dtype=torch.int64)), "eps"),
    "eps not a number": (step(eps="0.1"), "eps"),
    "per-pixel eps with l2": (step(eps=torch.rand(2, 1, 8, 8), norm="l2"), "eps"),
    "unknown norm": (step(norm="l3"), "norm"),
    "lo above hi": (step(lo=1.0, hi=0.0), "lo"),
    "infinite box": (step(hi=float("inf")), "hi"),
    "zero-dim x": (lambda: ops.pgd_step(torch.tensor(0.5), torch.tensor(0.1), torch.tensor(0.5), eps=0.1,
                                        alpha=0.1), "x"),
    "mask wrong shape": (masked(mask=torch.ones(2, 1, 7, 8, dtype=torch.bool)), "mask"),
    "mask float dtype": (masked(mask=torch.ones(2, 1, 8, 8)), "mask"),
    "negative eps_low": (masked(eps_low=-0.01), "eps_low"),
    "eps_high tensor": (masked(eps_high=torch.tensor(0.1)), "eps_high"),
    "random_init negative eps": (lambda: ops.random_init(X, eps=-1.0), "eps"),
    "random_init unknown norm": (lambda: ops.random_init(X, eps=0.1, norm="l1"), "norm"),
    "prompt inner larger than canvas": (pad(inner_size=20), "inner_size"),
    "prompt wrong shape": (pad(prompt=torch.randn(3, 15, 16)), "prompt"),
    "prompt wrong dtype": (pad(prompt=P.double()), "prompt"),
    "prompt x not 4-d": (pad(x=torch.rand(3, 8, 8)), "x"),
    "prompt unknown activation": (pad(activation="relu"), "activation"),
    "prompt unknown mode": (pad(mode="overlay"), "mode"),
    "prompt unknown normalize": (pad(mean=[0.5] * 3, std=[0.2] * 3, normalize="both"), "normalize"),
    "prompt mean without std": (pad(mean=[0.5] * 3), "std"),
    "prompt std wrong length": (pad(mean=[0.5] * 3, std=[0.2] * 2), "std"),
    "prompt zero std": (pad(mean=[0.5] * 3, std=[0.2, 0.0, 0.2]), "std"),
    "prompt bad out_size": (pad(out_size=(16, 16, 3)), "out_size"),
    "prompt negative inner": (pad(inner_size=-4), "inner_size"),
}


@pytest.mark.parametrize("path", ["native", "reference"])
@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_bad_input_raises_naming_argument(case, path):
    if path == "native" and not ops.has_native("cpu"):
        pytest.skip("compiled kernels are not loaded")
    call, name = BAD_CALLS[case]
    ctx = ops.reference_ops() if path == "reference" else contextlib.nullcontext()
    with ctx, pytest.raises((ValueError, RuntimeError)) as info:
        call()
    assert f"`{name}`" in str(info.value), str(info.value)


def test_at_least_twenty_cases():
    assert len(BAD_CALLS) >= 20


@pytest.mark.skipif(not ops.has_native("cpu"), reason="compiled kernels are not loaded")
def test_direct_op_calls_are_checked_in_cpp():
    fa = torch.ops.fastadv
    with pytest.raises(ValueError, match="`grad`"):
        fa.pgd_step(D, G[:1], X, 0.1, 0.1)
    with pytest.raises(ValueError, match="`norm`"):
        fa.pgd_step_(D.clone(), G, X, 0.1, 0.1, None, None, "l0")
    with pytest.raises(ValueError, match="`mask`"):
        fa.masked_pgd_step_(D.clone(), G, X, torch.ones(3, 8, 8, 8, dtype=torch.bool), 0.1, 0.1, 0.1)
    with pytest.raises(ValueError, match="`inner_size`"):
        fa.prompt_pad(X, P, [16, 16], [17, 8])
    with pytest.raises(ValueError, match="`grad_out`"):
        fa.prompt_pad_backward(torch.zeros(1), X, P, [16, 16], [8, 8], "tanh", "replace", None, None, "canvas",
                               True, True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; none is present")
def test_device_mismatch():
    with pytest.raises(ValueError, match="`grad`"):
        ops.pgd_step(D.cuda(), G, X.cuda(), eps=0.1, alpha=0.1)

"""The GPU path on a CUDA device: the compiled Triton kernels and the optimizer's default path there.

- the compiled kernel gives the same bits as the same kernel run by Triton's interpreter on the CPU (which
  tests/test_kernel_triton.py checks against a float64 reference), for fp32 and bf16 storage, both decays,
  non-finite gradients, and tensors that end in full, partial and masked chunks;
- the statistic the kernel emits equals a separate read of the updated tensors;
- AdamHD with default arguments on CUDA takes the fused path and follows the independent numpy reference;
- a flat buffer of many layers (a ZeRO partition with a FlatLayout) is updated in ONE launch per step and equals
  the same layers updated as separate tensors.

These tests need a CUDA device and are skipped without one (CI has none); ``bench/gpu_check.sh`` runs them on a GPU
machine, before its benchmarks.
"""

import numpy as np
import pytest
import torch

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (bench/gpu_check.sh)"),
    # the interpreter evaluates the non-finite lanes with numpy, which warns; the kernels handle those lanes
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
]

if torch.cuda.is_available():
    # the interpreted copy of the kernels and the helpers of the interpreter tests (which run on the CPU)
    import test_kernel_triton as TK
    from reference import RefAdamHD

    import adamhd_dist.optim.functional as F
    from adamhd_dist import AdamHD
    from adamhd_dist.optim.kernels import triton_adamhd as GPU
    from adamhd_dist.distributed.layout import FlatLayerStats, FlatLayout, Fragment

SIZES = [1, 7, 4096, 4099, 2 * 4096 + 5, 1 << 18, 0]


def _bits(t):
    """The raw bits of a tensor (NaN compares equal to the same NaN)."""
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def _run(mod, ps, gs, ms, vs, device, *, decay, wd, step=3, scale=None):
    n = len(ps)
    ss, bc = TK.scalars(step, n)
    deltas = torch.tensor([0.0, 0.5, 0.01, float("inf"), 2.0, 0.02, 0.3][:n], dtype=torch.float32)
    nf = torch.zeros(1, dtype=torch.int64, device=device)
    sums = torch.empty(n, dtype=torch.float32, device=device)
    mod.fused_adamhd_triton_(
        ps, gs, ms, vs, step_sizes=ss.to(device), bc2_sqrts=bc.to(device), deltas=deltas.to(device), lr=TK.LR,
        beta1=TK.B1, beta2=TK.B2, eps=TK.EPS, weight_decay=wd, decay=decay,
        grad_scale=None if scale is None else torch.tensor(scale, dtype=torch.float32, device=device),
        nonfinite=nf, abs_sums=sums)
    return int(nf.item()), sums.cpu()


@pytest.mark.parametrize("pdt", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("decay,wd,scale", [("prox", 0.2, None), ("clip", 0.2, 8.0), ("prox", 0.0, None)])
def test_compiled_kernel_equals_interpreter_bitwise(pdt, decay, wd, scale):
    cpu = TK.make(SIZES, pdt=pdt, seed=21)
    cpu[1][3][[0, 4098]] = torch.tensor([float("nan"), float("inf")]).to(cpu[1][3].dtype)
    cuda = [[t.cuda() for t in lst] for lst in cpu]
    bad_i, sums_i = _run(TK._MOD, *cpu, torch.device("cpu"), decay=decay, wd=wd, scale=scale)
    bad_c, sums_c = _run(GPU, *cuda, torch.device("cuda"), decay=decay, wd=wd, scale=scale)
    assert type(GPU._adamhd_kernel).__name__ != "InterpretedFunction"  # the compiled kernel ran
    assert bad_c == bad_i == 2
    for name, a, b in zip(("params", "grads", "exp_avgs", "exp_avg_sqs"), cpu, cuda):
        for i, (x, y) in enumerate(zip(a, b)):
            assert torch.equal(_bits(x), _bits(y.cpu())), f"{name}[{i}] (size {x.numel()}) differs between GPU and interpreter"
    # fp32 chunk sums: the order of the atomic adds and the in-block reduction tree may differ in the last bits
    torch.testing.assert_close(sums_c, sums_i, rtol=2e-6, atol=0)
    torch.testing.assert_close(sums_c, GPU.layer_abs_sums_triton(cuda[0]).cpu(), rtol=2e-6, atol=0)


def test_default_path_on_cuda_is_fused_and_follows_reference():
    torch.manual_seed(0)
    shapes = [(64, 32), (32,), (300, 7), (4099,)]
    init = [torch.randn(s, dtype=torch.float64) * 0.05 for s in shapes]
    params = [torch.nn.Parameter(t.float().cuda()) for t in init]
    assert F.default_path(params, None, None) == "fused"
    opt = AdamHD(params, lr=3e-2, betas=(0.9, 0.99), weight_decay=0.5, delta_scale=1.0, delta_beta=0.9)
    ref = RefAdamHD([t.numpy() for t in init], lr=3e-2, betas=(0.9, 0.99), weight_decay=0.5, delta_scale=1.0,
                    delta_beta=0.9)
    for _ in range(8):
        grads = [torch.randn(s, dtype=torch.float64) for s in shapes]
        for p, g in zip(params, grads):
            p.grad = g.float().cuda()
        opt.step()
        ref.step([g.numpy() for g in grads])
    for p, want in zip(params, ref.params):
        np.testing.assert_allclose(p.detach().double().cpu().numpy(), want, rtol=2e-5, atol=2e-7)


def test_flat_layout_one_launch_equals_separate_tensors(monkeypatch):
    numels = [4096 * 3 + 17, 1, 4099, 33, 1 << 16]
    starts = [0]
    for n in numels[:-1]:
        starts.append(starts[-1] + n)
    total = sum(numels)
    gen = torch.Generator().manual_seed(5)
    flat0 = torch.randn(total, generator=gen) * 0.05
    flat = torch.nn.Parameter(flat0.clone().cuda())
    sep = [torch.nn.Parameter(flat0[s:s + n].clone().cuda()) for s, n in zip(starts, numels)]
    hp = dict(lr=1e-2, weight_decay=0.3, delta_scale=1.2)
    opt_flat, opt_sep = AdamHD([flat], **hp, fused=True), AdamHD(sep, **hp, fused=True)
    frags = [Fragment(i, s, n) for i, (s, n) in enumerate(zip(starts, numels))]
    opt_flat.set_layer_stats(FlatLayerStats(FlatLayout([f"l{i}" for i in range(len(numels))], numels,
                                                       [0] * len(numels), {flat: frags}, None)))
    counter = TK.CountLaunches(GPU._adamhd_kernel)
    monkeypatch.setattr(GPU, "_adamhd_kernel", counter)
    steps = 5
    for _ in range(steps):
        g = torch.randn(total, generator=gen).cuda()
        flat.grad = g
        for p, s, n in zip(sep, starts, numels):
            p.grad = g[s:s + n].clone()
        opt_flat.begin_step()
        opt_flat.step()
        opt_sep.step()
    assert len(counter.grids) == 2 * steps  # one launch per step for each optimizer
    for p, s, n in zip(sep, starts, numels):
        torch.testing.assert_close(flat.detach()[s:s + n], p.detach(), rtol=1e-6, atol=1e-9)


def test_bf16_params_fp32_math_on_cuda():
    torch.manual_seed(1)
    x = torch.randn(5000) * 0.1
    p16 = torch.nn.Parameter(x.to(torch.bfloat16).cuda())
    p32 = torch.nn.Parameter(x.to(torch.bfloat16).float().cuda())
    o16 = AdamHD([p16], lr=1e-2, weight_decay=0.1, fused=True)
    o32 = AdamHD([p32], lr=1e-2, weight_decay=0.1, fused=True)
    g = torch.randn(5000).cuda()
    p16.grad, p32.grad = g.to(torch.bfloat16), g.to(torch.bfloat16).float()
    o16.step()
    o32.step()
    assert p16.dtype == torch.bfloat16 and o16.state[p16]["exp_avg"].dtype == torch.bfloat16
    # one step from the same values: the bf16 result is the fp32 result rounded once
    assert torch.equal(p16.detach(), p32.detach().to(torch.bfloat16))


def test_nonfinite_grad_leaves_elements_and_warns():
    p = torch.nn.Parameter(torch.randn(4099).cuda())
    before = p.detach().clone()
    opt = AdamHD([p], lr=1e-2, weight_decay=0.1, fused=True)
    g = torch.randn(4099).cuda()
    g[[3, 4000]] = float("nan")
    p.grad = g
    with pytest.warns(RuntimeWarning, match="2 gradient element"):
        opt.step()
        torch.cuda.synchronize()
        opt.step()  # the count is read once the GPU has finished (no sync inside step)
    assert torch.equal(p.detach()[[3, 4000]], before[[3, 4000]])
    assert not torch.equal(p.detach()[:3], before[:3])

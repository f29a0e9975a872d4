"""The kernels as PyTorch custom ops (torch.library): schemas, fake implementations and autograd formulas pass
PyTorch's own checker, and a fullgraph compile of M2D's training forward and backward with the Triton selection
traces on CPU (the ops run their CPU kernels: the Triton code interpreted, as everywhere in these tests)."""
import pytest
import torch

from fastm2d import kernels
from fastm2d.kernels import l2norm_mse as L
from fastm2d.kernels import masking as M
from fastm2d.kernels import noise_mix as N

pytestmark = pytest.mark.skipif(kernels.triton_unavailable_reason(torch.device("cpu")) is not None,
                                reason=str(kernels.triton_unavailable_reason(torch.device("cpu"))))


def _ids(b, n, k=None):
    return torch.stack([torch.randperm(n) for _ in range(b)])[:, :k or n].contiguous()


def _cases():
    g = dict(requires_grad=True)
    b, n, d = 2, 7, 5
    yield "gather_rows", M.gather_rows, (torch.randn(b, n, d, **g), _ids(b, n), torch.randn(n, d, **g))
    yield "gather_rows, part", M.gather_rows, (torch.randn(b, n, d, **g), _ids(b, n, 3), None)
    yield "scatter_rows", M.scatter_rows, (torch.randn(b, n, d, **g), _ids(b, n), torch.randn(n, d, **g), n)
    yield "scatter_rows, part", M.scatter_rows, (torch.randn(b, 3, d, **g), _ids(b, n, 3), None, n)
    yield "l2norm_mse_rows", L.loss_rows, (torch.randn(6, 9, **g), torch.randn(6, 9, **g), True)
    yield "l2norm_mse_rows, plain", L.loss_rows, (torch.randn(6, 9, **g), torch.randn(6, 9), False)
    yield "l2norm_mse_rows_backward", L.loss_rows_backward, (torch.randn(6, 9), torch.randn(6, 9), torch.randn(6),
                                                            True, True)
    yield "noise_mix", N.mix, (torch.randn(3, 11, **g), torch.randn(3, 11, **g), None, 0.3, -1.0, 0.5, 2.0)
    yield "noise_mix, per sample", N.mix, (torch.randn(3, 11, **g), torch.randn(3, 11, **g), torch.rand(3), 0.0,
                                           0.0, 0.0, 1.0)
    yield "noise_mix_backward", N.mix_backward, (torch.randn(3, 11), torch.randn(3, 11), None, torch.randn(3, 11),
                                                 0.3, 0.0, 0.0, 1.0)


@pytest.mark.parametrize("name, op, args", list(_cases()), ids=[c[0] for c in _cases()])
def test_every_kernel_op_passes_torch_library_opcheck(name, op, args):
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch, by PyTorch's own checker."""
    torch.library.opcheck(op, args)


def test_autograd_formulas_equal_the_references_gradients():
    """Per-row gradients of any shape (not only the mean's uniform one) through the loss op."""
    torch.manual_seed(0)
    p, t = torch.randn(5, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)
    w = torch.rand(5, dtype=torch.float64)
    for fn in (L._rows_reference, lambda a, b, s: L.loss_rows(a.float(), b.float(), s)):
        a, b = p.clone().requires_grad_(), t.clone().requires_grad_()
        (fn(a, b, True).double() * w).sum().backward()
        if fn is L._rows_reference:
            want = (a.grad, b.grad)
        else:
            assert torch.allclose(a.grad, want[0], atol=1e-5) and torch.allclose(b.grad, want[1], atol=1e-5)


def test_a_fullgraph_compile_of_the_training_step_with_triton_kernels_traces_on_cpu():
    """torch.compile(fullgraph=True) of M2D's forward with model.kernels=triton: no graph break (the kernels are
    ops, not Triton launches inside autograd.Functions); loss and every gradient equal the eager reference model."""
    from fastm2d.model import M2D
    from tests.conftest import tiny_model_config
    torch._dynamo.reset()
    torch.manual_seed(0)
    fast = M2D(tiny_model_config(kernels="triton"))
    ref = M2D(tiny_model_config(kernels="reference"))
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(2, 1, 80, 64)
    ids = fast.random_ids(2, x.device) if hasattr(fast, "random_ids") else \
        fast.ids_from_noise(torch.rand(2, fast.mask_noise_shape))
    compiled = torch.compile(fast, fullgraph=True, backend="aot_eager")
    out = compiled(x, ids)
    out["loss"].backward()
    want = ref(x, ids)
    want["loss"].backward()
    assert torch.allclose(out["loss"], want["loss"], atol=1e-5)
    for (name, a), b in zip(fast.named_parameters(), ref.parameters()):
        if a.grad is not None or b.grad is not None:
            assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-4), name


def _triton_and_reference_kernels():
    b, n, d = 2, 7, 5
    x, pos, ids, part = torch.randn(b, n, d), torch.randn(n, d), _ids(b, n), _ids(b, n, 3)
    yield "gather_rows", M._gather_rows_triton, M._gather_rows_reference, (x, ids, pos)
    yield "gather_rows, part", M._gather_rows_triton, M._gather_rows_reference, (x, part, None)
    yield "scatter_rows", M._scatter_rows_triton, M._scatter_rows_reference, (x, ids, pos, n)
    yield "scatter_rows, part", M._scatter_rows_triton, M._scatter_rows_reference, (x[:, :3], part, None, n)
    p, t = torch.randn(6, 9), torch.randn(6, 9) * 3 + 1
    for std in (True, False):
        yield f"l2norm_mse_rows std={std}", L._rows_triton, L._rows_reference, (p, t, std)
        yield (f"l2norm_mse_rows_backward std={std}", L._rows_backward_triton, L._rows_backward_reference,
               (p, t, torch.randn(6), std, True))
    xm, bg = torch.randn(3, 11) - 7, torch.randn(3, 11) - 6
    for eta_rows, eta in ((None, 0.3), (torch.rand(3), 0.0)):
        args = (xm, bg, eta_rows, eta, -7.1, -6.0, 4.2)
        yield f"noise_mix per_sample={eta_rows is not None}", N._mix_triton, N._mix_reference, args
        yield (f"noise_mix_backward per_sample={eta_rows is not None}", N._mix_backward_triton,
               N._mix_backward_reference, (xm, bg, eta_rows, torch.randn(3, 11), eta, -7.1, -6.0, 4.2))


@pytest.mark.parametrize("name, fast, reference, args", list(_triton_and_reference_kernels()),
                         ids=[c[0] for c in _triton_and_reference_kernels()])
def test_each_ops_cpu_kernel_equals_its_triton_kernel(name, fast, reference, args):
    """The ops' CPU kernels (the reference formulas, what runs on a CPU without the interpreter) against the Triton
    code on the same inputs: flipping the switch gives the same values and gradients."""
    got, want = fast(*args), reference(*args)
    for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), (name, (a - b).abs().max())

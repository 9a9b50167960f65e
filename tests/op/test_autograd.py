"""The ops are not differentiable: backward must refuse loudly, never leave A.grad silently None."""
import pytest
import torch

import fedrot_ext


def _factors(device, requires_grad, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(3, 4, 11, generator=g).to(device).requires_grad_(requires_grad)
    B = torch.randn(3, 9, 4, generator=g).to(device).requires_grad_(requires_grad)
    ref_A = torch.randn(4, 11, generator=g).to(device)
    return A, B, ref_A


def test_backward_through_align_and_aggregate_raises(device):
    A, B, ref_A = _factors(device, True)
    out = fedrot_ext.align_and_aggregate([A], [B], ref_A=[ref_A])
    assert out.A[0].requires_grad, "the output must stay attached to the graph, or backward would be silently skipped"
    loss = out.A[0].sum() + out.B[0].sum()
    with pytest.raises(RuntimeError, match=r"fedrot_ext::align_and_aggregate has no backward.*torch\.no_grad\(\).*detach"):
        loss.backward()
    assert A.grad is None and B.grad is None


def test_backward_through_procrustes_rotation_raises(device):
    M = torch.randn(2, 5, 5, generator=torch.Generator().manual_seed(1)).to(device).requires_grad_(True)
    R = fedrot_ext.procrustes_rotation(M, 1.0)
    with pytest.raises(RuntimeError, match=r"fedrot_ext::procrustes_rotation has no backward"):
        R.sum().backward()


def test_no_grad_and_detached_inputs_give_the_same_result(device):
    A, B, ref_A = _factors(device, True, seed=2)
    with torch.no_grad():
        under_no_grad = fedrot_ext.align_and_aggregate([A], [B], ref_A=[ref_A])
    detached = fedrot_ext.align_and_aggregate([A.detach()], [B.detach()], ref_A=[ref_A])
    assert not under_no_grad.A[0].requires_grad and not detached.A[0].requires_grad
    assert torch.equal(under_no_grad.A[0], detached.A[0]) and torch.equal(under_no_grad.B[0], detached.B[0])


def test_state_dict_aggregation_of_parameters_that_require_grad_is_refused_at_backward(device):
    g = torch.Generator().manual_seed(3)
    clients = [{"m.lora_A.weight": torch.randn(2, 6, generator=g).to(device).requires_grad_(),
                "m.lora_B.weight": torch.randn(5, 2, generator=g).to(device).requires_grad_()} for _ in range(2)]
    reference = {k: v.detach().clone() for k, v in clients[0].items()}
    out = fedrot_ext.aggregate_state_dicts(clients, reference=reference, round=1)
    with pytest.raises(RuntimeError, match="has no backward"):
        out["m.lora_A.weight"].sum().backward()

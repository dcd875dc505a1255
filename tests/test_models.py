"Forward/backward of every named model, the canonical training batch, and timm interop under a fastai Learner."
import math, resource
import pytest, torch
from torch import nn
from fastai_ranger.models import MODELS, make_model

@pytest.mark.parametrize('name', list(MODELS))
@pytest.mark.parametrize('size', [64, 128])
def test_forward_backward(name, size):
    torch.manual_seed(0)
    m = make_model(name, sa=True, pool='max', blurpool=True)
    x = torch.randn(2, 3, size, size)
    y = m(x)
    assert y.shape == (2, 10)
    y.logsumexp(1).sum().backward()
    grads = [p.grad for p in m.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)

def test_canonical_model_trains_batch32_at_128px():
    "xse_resnext50 + SA + MaxBlurPool: a training step on a batch of 32 at 128 px on CPU, within a modest memory budget"
    torch.manual_seed(0)
    m = make_model('xse_resnext50', sa=True, pool='max', blurpool=True)
    x, y = torch.randn(32, 3, 128, 128), torch.randint(0, 10, (32,))
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    w0 = [p.detach().clone() for p in m.parameters()]
    loss = nn.functional.cross_entropy(m(x), y)
    opt.zero_grad(); loss.backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in m.parameters()), "a parameter got no or a non-finite gradient"
    opt.step()
    rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"loss {loss.item():.4f}, peak RSS of the test process {rss_gib:.2f} GiB")
    assert math.isfinite(loss.item()) and 0 < loss.item() < 20, loss.item()
    moved = [not torch.equal(a, p) for a,p in zip(w0, m.parameters())]
    # fastai zero-initialises each residual branch's last BN weight, so step 1 reaches only part of the network: the head,
    # the BN weights that gate each branch and the identity path; a broken graph would leave (nearly) all of them unchanged
    assert moved[-2] and moved[-1] and sum(moved) >= 40, f"the step moved {sum(moved)} of {len(moved)} tensors"
    assert rss_gib < 12, "canonical model at bs 32 / 128 px should fit comfortably in 24 GiB"

def test_timm_mish_model_under_fastai_learner():
    "A timm model with Mish activations trains under a fastai Learner with the package's ranger opt_func"
    import timm
    from fastai.vision.all import Learner, DataLoaders, accuracy, CrossEntropyLossFlat
    from fastai_ranger.ranger import ranger
    torch.manual_seed(0)
    model = timm.create_model('resnet18', num_classes=4, act_layer=nn.Mish, pretrained=False)
    assert any(isinstance(o, nn.Mish) for o in model.modules())
    xs, ys = torch.randn(64, 3, 32, 32), torch.randint(0, 4, (64,))
    ds = list(zip(xs, ys))
    dls = DataLoaders.from_dsets(ds[:48], ds[48:], bs=16, device='cpu')
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), opt_func=ranger, metrics=accuracy)
    before = [p.detach().clone() for p in model.parameters()]
    with learn.no_bar(), learn.no_logging(): learn.fit_flat_cos(1, 1e-3)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(torch.isfinite(torch.tensor(v)).all() for v in learn.recorder.values[-1])

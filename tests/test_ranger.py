"Cross-checks of `Ranger` against independent references: torch.optim.RAdam, fastai's built-in `ranger`, and its own reference path."
import io, math, pytest, torch
from torch import nn
from torch.utils.data import TensorDataset
from fastai.learner import Learner
from fastai.callback.schedule import *
from fastai.data.core import DataLoaders
from fastai.torch_core import set_seed
from fastai.optimizer import ranger as fastai_ranger
from fastai_ranger.ranger import Ranger, ranger, radam_rect

TOL = 1e-5  # stated tolerance: max |a-b| / max |b| per parameter tensor
# Different correct implementations round differently; in fp32 over 200 steps of real training these differences are
# amplified chaotically (elements whose sqrt(v) is near eps), reaching ~1e-3. So the 200-step trajectories run in
# float64 (where agreement is ~1e-12, far inside TOL), and the fp32 comparisons run 10 steps (5 SGD + 5 rectified) at TOL.
# The conv before BN has no bias: its gradient would be pure rounding noise, which Adam's m/sqrt(v) normalises to O(1).

def model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3,8,3,bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8,4,3), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4*4*4, 5)).to(dtype)

def max_rel(m1, m2):
    return max(((a-b).abs().max()/b.abs().max()).item() for a,b in zip(m1.parameters(), m2.parameters()))

def trajectory(make_opt, steps=200, dtype=torch.float32, seed=0):
    "Train `model` on fixed random data (real gradients) for `steps` steps"
    m = model(seed, dtype); opt = make_opt(m.parameters())
    g = torch.Generator().manual_seed(seed+1)
    x = torch.randn(16, 3, 8, 8, generator=g, dtype=dtype); y = torch.randint(0, 5, (16,), generator=g)
    for i in range(steps):
        xb = x + 0.1*torch.randn(x.shape, generator=g, dtype=dtype)
        loss = nn.functional.cross_entropy(m(xb), y)
        opt.zero_grad(); loss.backward(); opt.step()
    return m

@pytest.mark.parametrize('la,foreach', [(dict(alpha=1.), None), (dict(k=1, alpha=1.), False)])
def test_equals_torch_radam(la, foreach):
    "Lookahead off + eps_mode='lessw2020' == torch.optim.RAdam(decoupled_weight_decay=True): 200 float64 steps, 10 fp32 steps"
    kw = dict(lr=3e-3, betas=(0.95, 0.99), eps=1e-6, weight_decay=0.05)
    for dtype,steps in ((torch.float64, 200), (torch.float32, 10)):
        ours = trajectory(lambda ps: Ranger(ps, eps_mode='lessw2020', foreach=foreach, **kw, **la), steps, dtype)
        ref = trajectory(lambda ps: torch.optim.RAdam(ps, decoupled_weight_decay=True, **kw), steps, dtype)
        assert max_rel(ours, ref) < TOL, (dtype, max_rel(ours, ref))

def test_fastai_eps_mode_differs_from_torch():
    "The default eps placement is fastai's, not torch's: the two must differ measurably with a large eps"
    kw = dict(lr=3e-3, betas=(0.95, 0.99), eps=1e-2, weight_decay=0.)
    ours = trajectory(lambda ps: Ranger(ps, alpha=1., **kw), steps=20)
    ref = trajectory(lambda ps: torch.optim.RAdam(ps, decoupled_weight_decay=True, **kw), steps=20)
    assert max_rel(ours, ref) > 1e-4

@pytest.mark.parametrize('gc', [None, 'conv', 'all'])
def test_reference_equals_fast(gc):
    for dtype,steps,tol in ((torch.float32, 10, TOL), (torch.float64, 200, 1e-10)):
        a = trajectory(lambda ps: Ranger(ps, lr=3e-3, gc=gc, foreach=False), steps, dtype)
        b = trajectory(lambda ps: Ranger(ps, lr=3e-3, gc=gc), steps, dtype)
        assert max_rel(b, a) < tol, (dtype, max_rel(b, a))

def test_gc_leaves_grad_alone():
    m = model(); opt = Ranger(m.parameters(), gc='all')
    for p in m.parameters(): p.grad = torch.randn_like(p)
    before = [p.grad.clone() for p in m.parameters()]
    opt.step()
    for p,b in zip(m.parameters(), before): assert torch.equal(p.grad, b)

def _learner(opt_func, seed=0):
    set_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(160, 3, 8, 8, generator=g, dtype=torch.float64); y = torch.randint(0, 5, (160,), generator=g)
    dls = DataLoaders.from_dsets(TensorDataset(x[:128], y[:128]), TensorDataset(x[128:], y[128:]), bs=16, device='cpu')
    # the float64 loss is cast to float32 for fastai's Recorder; the backward seed 1.0 is exact, gradients stay float64
    return Learner(dls, model(seed, torch.float64), loss_func=lambda o, y: nn.functional.cross_entropy(o, y).float(), opt_func=opt_func)

@pytest.mark.parametrize('sched', ['one_cycle', 'flat_cos'])
def test_equals_fastai_ranger(sched):
    "Through a fastai Learner (wd_bn_bias=False default, float64): 25 epochs x 8 batches = 200 steps"
    res = []
    for of in (fastai_ranger, ranger):
        learn = _learner(of)
        with learn.no_logging():
            learn.remove_cb(learn.cbs.filter(lambda c: type(c).__name__ == 'ProgressCallback')[0]) if any(
                type(c).__name__ == 'ProgressCallback' for c in learn.cbs) else None
            set_seed(1)
            if sched == 'one_cycle': learn.fit_one_cycle(25, 3e-3, wd=0.05)
            else: learn.fit_flat_cos(25, 3e-3, wd=0.05)
        assert learn.train_iter == 200
        res.append(learn.model)
    assert max_rel(res[1], res[0]) < TOL

def test_resume_bit_identical_weights_only():
    def run(opt, m, a, b):
        for i in range(a, b):
            g = torch.Generator().manual_seed(i)
            for p in m.parameters(): p.grad = torch.randn(p.shape, generator=g)
            opt.step()
    m1, m2 = model(), model()
    o1 = Ranger(m1.parameters(), lr=1e-2, k=5); run(o1, m1, 0, 8)
    buf = io.BytesIO(); torch.save({'model': m1.state_dict(), 'opt': o1.state_dict()}, buf); buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    m2.load_state_dict(sd['model']); o2 = Ranger(m2.parameters(), lr=1e-2, k=5); o2.load_state_dict(sd['opt'])
    run(o1, m1, 8, 30); run(o2, m2, 8, 30)
    for a, b in zip(m1.parameters(), m2.parameters()): assert torch.equal(a, b)
    for a, b in zip(o1.state.values(), o2.state.values()):
        assert a['step'] == b['step'] == 30 and torch.equal(a['slow'], b['slow'])

def test_rect_constants():
    assert abs(radam_rect(0.999, 1000) - 0.64532565) < 1e-8 and abs(radam_rect(0.99, 100) - 0.63411685) < 1e-8
    assert radam_rect(0.99, 5) is None and radam_rect(0.99, 6) is not None

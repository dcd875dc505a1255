"Adan against an independent implementation of the published (sail-sg) algorithm, plus state and input checks"
import copy, io, math
import pytest, torch
from torch import nn
from fastai_ranger.adan import Adan


@pytest.fixture(autouse=True, scope='module')
def _one_thread():
    "Tiny tensors: one thread avoids OpenMP spin-waits on a busy CI machine"
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def indep_adan(params, grads, st, lr, betas, eps, wd, no_prox, max_grad_norm):
    "Straightforward Adan on lists of plain tensors (no package code): the equations of optimizers.md, literally"
    b1, b2, b3 = betas
    if max_grad_norm > 0:
        total = math.sqrt(sum(float((g*g).sum()) for g in grads))
        c = min(1.0, max_grad_norm/(total+eps))
        grads = [g*c for g in grads]
    st['t'] = st.get('t', 0) + 1
    t = st['t']
    out = []
    for i, (p, g) in enumerate(zip(params, grads)):
        if i not in st: st[i] = dict(m=torch.zeros_like(p), v=torch.zeros_like(p), n=torch.zeros_like(p), prev=g)
        s = st[i]
        d = g - s['prev']
        s['m'] = b1*s['m'] + (1-b1)*g
        s['v'] = b2*s['v'] + (1-b2)*d
        s['n'] = b3*s['n'] + (1-b3)*(g + b2*d)**2
        D = torch.sqrt(s['n'])/math.sqrt(1-b3**t) + eps
        u = (s['m']/(1-b1**t) + b2*s['v']/(1-b2**t)) / D
        p = p*(1-lr*wd) - lr*u if no_prox else (p - lr*u)/(1+lr*wd)
        s['prev'] = g
        out.append(p)
    return out


def _problem(dtype, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 4)).to(dtype)
    x, y = torch.randn(64, 10, dtype=dtype), torch.randn(64, 4, dtype=dtype)
    return model, x, y


def _grads(model, x, y, k):
    "Deterministic, step-dependent minibatch loss gradients"
    idx = torch.arange(16) + (k*16) % 48
    model.zero_grad()
    ((model(x[idx]) - y[idx])**2).mean().backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def _compare(n_steps, dtype, tol, hp, **opt_kw):
    "Train a package-optimised model and an independently optimised copy side by side; compare the weights"
    model, x, y = _problem(dtype)
    twin = copy.deepcopy(model)
    route = opt_kw.pop('route', None)
    opt = Adan(model.parameters(), **hp, **opt_kw)
    opt.engine.route = route   # the engine's switch: 'gpu' runs the GPU route (all tensors in one flat kernel call) on CPU tensors
    st, worst = {}, 0.
    for k in range(n_steps):
        _grads(model, x, y, k); opt.step()
        g_ref = _grads(twin, x, y, k)
        new = indep_adan([p.detach() for p in twin.parameters()], g_ref, st, hp['lr'], hp['betas'], hp['eps'],
                         hp['weight_decay'], hp['no_prox'], hp['max_grad_norm'])
        with torch.no_grad():
            for p, r in zip(twin.parameters(), new): p.copy_(r)
        for p, r in zip(model.parameters(), twin.parameters()):
            worst = max(worst, float(((p-r).abs()/(r.abs()+1e-3)).max().detach()))
    assert worst < tol, f"max relative deviation {worst:.3g} >= {tol}"
    return worst


SETTINGS = [dict(no_prox=False, max_grad_norm=0., weight_decay=0.02),
            dict(no_prox=True, max_grad_norm=0., weight_decay=0.02),
            dict(no_prox=False, max_grad_norm=0.5, weight_decay=0.02),
            dict(no_prox=True, max_grad_norm=0.5, weight_decay=0.),
            dict(no_prox=False, max_grad_norm=0., weight_decay=0.)]


def _hp(s): return dict(lr=3e-3, betas=(0.98, 0.92, 0.99), eps=1e-8, **s)


# every setting on the default fast path; the reference path, the compiled kernel and the GPU route on two settings each
CASES = [(s, dict()) for s in SETTINGS] + [(SETTINGS[i], dict(foreach=False)) for i in (1, 2)] + \
        [(SETTINGS[i], dict(fused=True)) for i in (0, 3)] + [(SETTINGS[i], dict(route='gpu')) for i in (1, 2)]


@pytest.mark.parametrize("setting,path", CASES)
def test_200_steps_float64(setting, path):
    _compare(200, torch.float64, 1e-9, _hp(setting), **path)


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("path", [dict(foreach=False), dict(fused=False)])
def test_20_steps_float32(setting, path):
    _compare(20, torch.float32, 1e-4, _hp(setting), **path)


def _traj(n, dtype=torch.float32, **kw):
    model, x, y = _problem(dtype, seed=3)
    opt = Adan(model.parameters(), lr=1e-2, max_grad_norm=1., **kw)
    opt.state[model[0].bias]['do_wd'] = False
    for k in range(n):
        _grads(model, x, y, k); opt.step()
    return [p.detach().clone() for p in model.parameters()], opt


def test_reference_equals_fast_path():
    for dtype in (torch.float64, torch.float32):
        a, _ = _traj(50, dtype, foreach=False)
        b, _ = _traj(50, dtype, fused=False)
        for u, v in zip(a, b): assert torch.equal(u, v)
    a, _ = _traj(10, torch.float32, foreach=False)
    c, _ = _traj(10, torch.float32, fused=True)
    for u, v in zip(a, c): torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("path", [dict(foreach=False), dict(fused=False), dict(fused=True)])
@pytest.mark.parametrize("no_prox", [False, True])
def test_step1_invariant(path, no_prox):
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(300, 300, dtype=torch.float64)); p0 = p.detach().clone()
    p.grad = torch.randn_like(p)
    lr, wd = 0.05, 0.1
    Adan([p], lr=lr, weight_decay=wd, no_prox=no_prox, **path).step()
    u = p.grad/(p.grad.abs()+1e-8)
    exp = p0*(1-lr*wd) - lr*u if no_prox else (p0 - lr*u)/(1+lr*wd)
    torch.testing.assert_close(p.detach(), exp, rtol=1e-12, atol=1e-12)



@pytest.mark.parametrize("path", [dict(foreach=False), dict(fused=False)])
def test_restart_opt(path):
    model, x, y = _problem(torch.float64)
    opt = Adan(model.parameters(), lr=1e-2, **path)
    for k in range(5): _grads(model, x, y, k); opt.step()
    opt.restart_opt()
    snap = [p.detach().clone() for p in model.parameters()]
    _grads(model, x, y, 5); grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    fresh = [nn.Parameter(s.clone()) for s in snap]
    for f, g in zip(fresh, grads): f.grad = g
    Adan(fresh, lr=1e-2, **path).step()
    for p, f in zip(model.parameters(), fresh): assert torch.equal(p.detach(), f.detach())
    assert all(s['step'] == 1 for s in opt.state.values())


@pytest.mark.parametrize("path", [dict(foreach=False), dict(fused=False)])
def test_state_dict_roundtrip_bit_identical(path):
    def run(n_before, n_after, sd=None):
        model, x, y = _problem(torch.float32, seed=5)
        opt = Adan(model.parameters(), lr=1e-2, max_grad_norm=0.5, **path)
        opt.state[model[2].bias]['do_wd'] = False
        for k in range(n_before): _grads(model, x, y, k); opt.step()
        if sd is not None:
            buf = io.BytesIO(); torch.save(sd, buf); buf.seek(0)
            msd, osd = torch.load(buf, weights_only=True)
            model.load_state_dict(msd); opt.load_state_dict(osd)
        for k in range(n_after): _grads(model, x, y, 8+k); opt.step()
        return model, opt
    full, _ = run(8, 6)
    m8, o8 = run(8, 0)
    resumed, ro = run(0, 6, sd=(m8.state_dict(), o8.state_dict()))
    for a, b in zip(full.parameters(), resumed.parameters()): assert torch.equal(a, b)
    assert ro.state[resumed[2].bias]['do_wd'] is False
    assert all(s['step'] == 14 for s in ro.state.values())


@pytest.mark.parametrize("kw,name", [(dict(lr=-1.), 'lr'), (dict(betas=(1.0, 0.92, 0.99)), 'betas[0]'),
                                     (dict(betas=(0.98, -0.1, 0.99)), 'betas[1]'), (dict(betas=(0.98, 0.92, 1.)), 'betas[2]'),
                                     (dict(betas=(0.9, 0.99)), 'betas'), (dict(eps=0.), 'eps'), (dict(eps=-1e-8), 'eps'),
                                     (dict(weight_decay=-0.01), 'weight_decay'), (dict(max_grad_norm=-1.), 'max_grad_norm'),
                                     (dict(nonfinite='yes'), 'nonfinite'), (dict(foreach='fast'), 'foreach')])
def test_bad_inputs(kw, name):
    with pytest.raises(ValueError, match=name.replace('[', r'\[').replace(']', r'\]')):
        Adan([nn.Parameter(torch.ones(2))], **kw)


def test_sparse_and_nonfinite():
    emb = nn.Embedding(10, 3, sparse=True); emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match='sparse'): Adan(emb.parameters()).step()
    p = nn.Parameter(torch.ones(3)); opt = Adan([p], nonfinite='skip')
    p.grad = torch.tensor([1., float('nan'), 0.])
    with pytest.warns(UserWarning): opt.step()
    assert torch.equal(p.detach(), torch.ones(3)) and 'step' not in opt.state[p]

"RangerLARS against an independent per-tensor transcription of over9000's Lookahead(Ralamb), and against Ranger."
import io, math, pytest, torch
from torch import nn
from fastai_ranger.ranger import Ranger
from fastai_ranger.ranger_lars import RangerLARS, LARS

TOL = 1e-5   # max |a-b| / max |b| per tensor; trajectories in float64 (fp32 rounding is amplified chaotically)

def model(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(3,8,3,bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8*6*6, 5)).to(dtype)
    with torch.no_grad(): m[4].weight.mul_(60.)   # one tensor with ‖w‖ > 10 so the over9000 ratio is active (< 1)
    return m

def max_rel(m1, m2): return max(((a-b).abs().max()/b.abs().max()).item() for a,b in zip(m1.parameters(), m2.parameters()))

class Over9000:
    "Straightforward per-tensor RAdam direction + over9000 trust ratio + eager Lookahead, written from the equations"
    def __init__(self, params, lr, b1, b2, eps, wd, k, alpha, trust='over9000', raw_eps=False):
        self.ps = list(params); self.h = (lr, b1, b2, eps, wd, k, alpha); self.trust, self.raw_eps = trust, raw_eps
        self.st = [dict(t=0, m=torch.zeros_like(p), v=torch.zeros_like(p), slow=p.detach().clone()) for p in self.ps]
    @torch.no_grad()
    def step(self):
        lr, b1, b2, eps, wd, k, alpha = self.h
        for p, s in zip(self.ps, self.st):
            g = p.grad
            s['t'] += 1; t = s['t']
            s['m'] = b1*s['m'] + (1-b1)*g; s['v'] = b2*s['v'] + (1-b2)*g*g
            w = p*(1 - lr*wd)
            rho_inf = 2/(1-b2) - 1; rho = rho_inf - 2*t*b2**t/(1-b2**t)
            if rho > 5:
                r = math.sqrt((rho-4)*(rho-2)*rho_inf/((rho_inf-4)*(rho_inf-2)*rho))
                den = s['v'].sqrt()/math.sqrt(1-b2**t) + (eps/math.sqrt(1-b2**t) if self.raw_eps else eps)
                u = r/(1-b1**t) * s['m']/den
            else: u = s['m']/(1-b1**t)
            if self.trust == 'over9000':
                wn, nn_ = w.norm().item(), (w - lr*u).norm().item()
                tau = 1. if wn == 0 or nn_ == 0 else min(wn, 10.)/nn_
            else:
                wn, un = w.norm().item(), u.norm().item()
                tau = 1. if wn == 0 or un == 0 else wn/un
            p.copy_(w - lr*tau*u)
            if t % k == 0: s['slow'] += alpha*(p - s['slow']); p.copy_(s['slow'])

def trajectory(make, steps=200, dtype=torch.float64, seed=0):
    m = model(seed, dtype); opt = make(m.parameters())
    g = torch.Generator().manual_seed(seed+1)
    x = torch.randn(16, 3, 8, 8, generator=g, dtype=dtype); y = torch.randint(0, 5, (16,), generator=g)
    for i in range(steps):
        for p in m.parameters(): p.grad = None
        nn.functional.cross_entropy(m(x + 0.1*torch.randn(x.shape, generator=g, dtype=dtype)), y).backward()
        opt.step()
    return m

HP = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=1e-2, k=6, alpha=0.5)

@pytest.mark.parametrize('trust', ['over9000', 'lamb'])
@pytest.mark.parametrize('eps_mode', ['fastai', 'lessw2020'])
# (no conv bias before BN: its gradient is rounding noise, which the LAMB ratio ‖w‖/‖u‖ would amplify to O(lr·‖w‖))
def test_equals_independent_over9000(trust, eps_mode, foreach=None):
    lr, (b1, b2), eps, wd, k, a = HP['lr'], HP['betas'], HP['eps'], HP['weight_decay'], HP['k'], HP['alpha']
    ours = trajectory(lambda ps: RangerLARS(ps, trust=trust, eps_mode=eps_mode, foreach=foreach, **HP))
    ref = trajectory(lambda ps: Over9000(ps, lr, b1, b2, eps, wd, k, a, trust, raw_eps=eps_mode == 'lessw2020'))
    assert max_rel(ours, ref) < TOL

def test_trust_ratio_active():
    "The large tensor's ratio really is < 1 (so the test above is not Ranger in disguise)"
    ours = trajectory(lambda ps: RangerLARS(ps, **HP), steps=20)
    plain = trajectory(lambda ps: Ranger(ps, **HP), steps=20)
    assert (ours[4].weight - plain[4].weight).abs().max() > 1e-6

@pytest.mark.parametrize('foreach', [False, None])
def test_ratio_one_equals_ranger(foreach):
    a = trajectory(lambda ps: RangerLARS(ps, trust=None, foreach=foreach, **HP))
    b = trajectory(lambda ps: Ranger(ps, foreach=foreach, **HP))
    assert max_rel(a, b) < 1e-12

def test_small_weights_ratio_close_to_one():
    "With every ‖w‖ < 10 the over9000 ratio is ~1: one step from zero-ish state equals Ranger's up to O(lr·u/w)"
    torch.manual_seed(0); p1 = nn.Parameter(torch.randn(50, dtype=torch.float64)); p2 = nn.Parameter(p1.detach().clone())
    o1, o2 = RangerLARS([p1], lr=1e-4), Ranger([p2], lr=1e-4)
    p1.grad = torch.randn(50, dtype=torch.float64); p2.grad = p1.grad.clone(); o1.step(); o2.step()
    assert torch.allclose(p1, p2, rtol=0, atol=1e-8)

@pytest.mark.parametrize('trust', ['over9000', 'lamb', None])
def test_reference_equals_fast_fp32(trust):
    a = trajectory(lambda ps: RangerLARS(ps, trust=trust, foreach=False, **HP), steps=10, dtype=torch.float32)
    b = trajectory(lambda ps: RangerLARS(ps, trust=trust, **HP), steps=10, dtype=torch.float32)
    assert max_rel(b, a) < TOL

def test_zero_norm_ratio_is_one():
    p = nn.Parameter(torch.zeros(4)); o = RangerLARS([p], lr=0.1, weight_decay=0.)
    p.grad = torch.ones(4); o.step()
    assert torch.allclose(p.detach(), -0.1*torch.ones(4))

def test_bad_input_and_sparse():
    ps = list(model().parameters())
    for kw, name in [(dict(lr=-1.), 'lr'), (dict(betas=(1., .99)), 'betas[0]'), (dict(eps=0.), 'eps'), (dict(k=0), 'k'),
                     (dict(alpha=0.), 'alpha'), (dict(alpha=1.01), 'alpha'), (dict(trust='lars'), 'trust')]:
        with pytest.raises(ValueError, match=name.replace('[', r'\[').replace(']', r'\]')): RangerLARS(ps, **kw)
    emb = nn.Embedding(5, 2, sparse=True); emb(torch.tensor([1])).sum().backward()
    with pytest.raises(RuntimeError, match='sparse'): RangerLARS(emb.parameters()).step()
    with pytest.raises(RuntimeError, match='sparse'): LARS(torch.optim.SGD(emb.parameters(), lr=0.1)).step()

def test_lars_wrapper_excludes_1d_and_restores_wd():
    m = model(dtype=torch.float32)
    opt = LARS(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4))
    g = torch.Generator().manual_seed(0)
    for p in m.parameters(): p.grad = torch.randn(p.shape, generator=g)
    b = m[1].bias.grad.clone(); bn_w = m[1].bias.detach().clone()
    opt.step()
    # the 1-d BN bias got plain SGD with coupled decay (momentum buffer = grad + wd*w at step 1)
    assert torch.allclose(opt.state[m[1].bias]['momentum_buffer'], b + 1e-4*bn_w)
    assert opt.param_groups[0]['weight_decay'] == 1e-4

def _routed(route, **kw):
    def make(ps):
        o = RangerLARS(ps, **kw); o.engine.route = route
        return o
    return make

@pytest.mark.parametrize('trust', ['over9000', 'lamb'])
def test_gpu_route_equals_independent_over9000(trust):
    "The GPU route (flat rows, trust ratios on the device), selected on CPU tensors by the engine's switch"
    lr, (b1, b2), eps, wd, k, a = HP['lr'], HP['betas'], HP['eps'], HP['weight_decay'], HP['k'], HP['alpha']
    ours = trajectory(_routed('gpu', trust=trust, **HP), steps=60)
    ref = trajectory(lambda ps: Over9000(ps, lr, b1, b2, eps, wd, k, a, trust), steps=60)
    assert max_rel(ours, ref) < TOL

def test_engines_are_per_optimizer():
    "A failed (or switched) engine is its own optimizer's: no state shared between instances"
    ps1, ps2 = list(model().parameters()), list(model().parameters())
    o1, o2 = RangerLARS(ps1, **HP), RangerLARS(ps2, **HP)
    o1.engine.fail(); o1.engine.route = 'gpu'
    assert o1.engine is not o2.engine and not o2.engine.failed and o2.engine.route is None
    assert all(a is not b for a, b in zip(o1.engine.kernels.values(), o2.engine.kernels.values()))
    with pytest.raises(ValueError, match='route'): o2.engine.route = 'tpu'

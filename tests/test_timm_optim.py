"timm optimizer-factory cross-checks (registration, names and grouping are tested in nbs/06_timm_optim): the factory adds nothing, decay groups, the lookahead_ prefix"
import pytest, torch
import timm, timm.optim
import fastai_ranger.timm_optim  # registers our names with timm's factory
from fastai_ranger.adan import Adan


pytestmark = pytest.mark.usefixtures('one_thread') # small tensors: one thread avoids OpenMP spin-waits on a busy CI machine


def _model(seed=0):
    torch.manual_seed(seed)
    return timm.create_model('resnet10t', num_classes=4, pretrained=False)


def _steps(model, opt, n=2):
    torch.manual_seed(1)
    x = torch.randn(2, 3, 32, 32)
    for _ in range(n):
        opt.zero_grad(); model(x).logsumexp(1).mean().backward(); opt.step()


def test_timm_adan_matches_direct_construction():
    "The factory adds nothing of its own: same groups by hand give bit-identical weights"
    m1, m2 = _model(), _model()
    o1 = timm.optim.create_optimizer_v2(m1, 'fradan', lr=1e-2, weight_decay=0.02, fused=False)
    o2 = Adan(timm.optim.param_groups_weight_decay(m2, 0.02), lr=1e-2, weight_decay=0., fused=False)
    _steps(m1, o1); _steps(m2, o2)
    for a, b in zip(m1.parameters(), m2.parameters()): assert torch.equal(a, b)


def test_no_decay_group_really_has_no_decay():
    "With a zero loss gradient, only the weight-decay group moves (Adan's decay acts even without gradients)"
    m = _model()
    opt = timm.optim.create_optimizer_v2(m, 'fradanw', lr=0.1, weight_decay=0.5, fused=False)
    for p in m.parameters(): p.grad = torch.zeros_like(p)
    w0 = {p: p.detach().clone() for p in m.parameters()}
    opt.step()
    for g in opt.param_groups:
        for p in g['params']:
            if g['weight_decay'] == 0: assert torch.equal(p, w0[p])
            else: torch.testing.assert_close(p.detach(), w0[p]*(1-0.1*0.5))


def test_lookahead_prefix_and_timm_names_untouched():
    opt = timm.optim.create_optimizer_v2(_model(), 'lookahead_fradan', lr=1e-3, fused=False)
    assert type(opt).__name__ == 'Lookahead' and isinstance(opt._base_optimizer, Adan)
    # the documented pitfall: timm only reads the part after the last '_', so 'ranger_lars' is timm's plain LARS
    assert type(timm.optim.create_optimizer_v2(_model(), 'ranger_lars', lr=1e-3)) is timm.optim.Lars

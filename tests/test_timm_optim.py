"timm optimizer-factory integration: our names build our classes, with timm's weight-decay grouping"
import pytest, torch
import timm, timm.optim
import fastai_ranger.timm_optim as fto
from fastai_ranger.adan import Adan
from fastai_ranger.ranger import Ranger
from fastai_ranger.ranger_lars import RangerLARS


pytestmark = pytest.mark.usefixtures('one_thread') # small tensors: one thread avoids OpenMP spin-waits on a busy CI machine


def _model(seed=0):
    torch.manual_seed(seed)
    return timm.create_model('resnet10t', num_classes=4, pretrained=False)


def _steps(model, opt, n=2):
    torch.manual_seed(1)
    x = torch.randn(2, 3, 32, 32)
    for _ in range(n):
        opt.zero_grad(); model(x).logsumexp(1).mean().backward(); opt.step()


@pytest.mark.parametrize("name,cls,kw", [('fradan', Adan, dict(fused=False)), ('fradanw', Adan, dict(fused=False)),
                                         ('ranger', Ranger, {}), ('franger', Ranger, {}),
                                         ('rangerlars', RangerLARS, {}), ('frangerlars', RangerLARS, {})])
def test_create_and_step(name, cls, kw):
    m = _model()
    opt = timm.optim.create_optimizer_v2(m, name, lr=1e-2, weight_decay=0.05, **kw)
    assert type(opt) is cls
    groups = {g['weight_decay']: g for g in opt.param_groups}
    assert set(groups) == {0., 0.05}
    assert all(p.ndim <= 1 for p in groups[0.]['params']) and all(p.ndim > 1 for p in groups[0.05]['params'])
    w0 = [p.detach().clone() for p in m.parameters()]
    _steps(m, opt)
    moved = sum(not torch.equal(a, p) for a, p in zip(w0, m.parameters()))
    assert moved >= 0.9*len(w0)
    assert all(torch.isfinite(p).all() for p in m.parameters())
    if cls is Adan: assert opt.param_groups[0]['no_prox'] == (name == 'fradanw')


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
    assert timm.optim.get_optimizer_info('adan').opt_class is timm.optim.Adan
    # the documented pitfall: timm only reads the part after the last '_', so 'ranger_lars' is timm's plain LARS
    assert type(timm.optim.create_optimizer_v2(_model(), 'ranger_lars', lr=1e-3)) is timm.optim.Lars


def test_register_is_idempotent_and_validates():
    assert fto.register_timm() == list(fto.TIMM_OPTIMIZERS)
    with pytest.raises(ValueError, match='Unknown optimizer name'): fto.register_timm(names='adan_fr')

"Every fastai feature the recipes rely on, with each of the package's opt_funcs, on a tiny CPU Learner."
import math, random, warnings, pytest, torch
from torch import nn
from torch.amp import GradScaler, autocast
from torch.utils.data import TensorDataset
from fastai.learner import Learner
from fastai.callback.core import Callback
from fastai.callback.schedule import *
from fastai.callback.fp16 import MixedPrecision
from fastai.data.core import DataLoaders
from fastai.torch_core import set_seed
from fastai_ranger.ranger import ranger
from fastai_ranger.ranger_lars import ranger_lars
from fastai_ranger.registry import OPTS

OPT_FUNCS = {s.name: s.func() for s in OPTS.values() if s.ours} # every opt_func of this package, from the registry

@pytest.fixture(params=list(OPT_FUNCS))
def opt_func(request): return OPT_FUNCS[request.param]

def splitter(m): return [list(m[0].parameters()), list(m[1:].parameters())]

def learner(opt_func, seed=0, data_seed=0, **kw):
    set_seed(seed)
    g = torch.Generator().manual_seed(data_seed)
    x = torch.randn(96, 6, generator=g); y = (x[:, :3].sum(1) > 0).long()
    dls = DataLoaders.from_dsets(TensorDataset(x[:64], y[:64]), TensorDataset(x[64:], y[64:]), bs=16, device='cpu')
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
    learn = Learner(dls, model, loss_func=nn.CrossEntropyLoss(), opt_func=opt_func, splitter=splitter, **kw)
    learn.remove_cbs([c for c in learn.cbs if type(c).__name__ == 'ProgressCallback'])
    return learn

def fit(learn, meth, *args, **kw):
    with learn.no_logging(): getattr(learn, meth)(*args, **kw)

class Watch(Callback):
    "Record the torch optimizer's first param group (hyperparameters only) after every batch"
    order = 100
    def before_fit(self): self.hist = []
    def after_batch(self):
        if self.training: self.hist.append({k: v for k, v in self.opt.opt.param_groups[-1].items() if k != 'params'})

def test_fit_one_cycle_drives_beta1(opt_func):
    learn = learner(opt_func, cbs=Watch())
    fit(learn, 'fit_one_cycle', 4, 1e-2)
    hist = learn.watch.hist
    rec_mom = [h for h in learn.recorder.hps['mom']]
    assert min(rec_mom) < 0.86 and max(rec_mom) > 0.94    # fastai's one-cycle mom schedule 0.95 -> 0.85 -> 0.95
    # the torch optimizer really sees a changing first-moment coefficient
    first = hist[0]; mid = hist[len(hist)//2 - 1]
    changed = [k for k in first if first[k] != mid[k] and k != 'lr']
    assert changed, f"no hyperparameter besides lr changed: {first} vs {mid}"
    if 'betas' in first and opt_func in (ranger, ranger_lars):
        betas1 = [h['betas'][0] for h in hist]
        assert abs(min(betas1) - min(rec_mom)) < 1e-3
        assert all(abs(b - m) < 1e-12 for b, m in zip(betas1, rec_mom))

def test_fit_flat_cos_and_sgdr(opt_func):
    learn = learner(opt_func)
    fit(learn, 'fit_flat_cos', 2, 1e-2)
    lrs = learn.recorder.lrs
    n = len(lrs)   # 8 batches: flat for 75 %, then cosine annealing
    assert all(l == pytest.approx(1e-2) for l in lrs[:int(0.75*n)]) and lrs[-1] < 0.6e-2
    assert all(math.isfinite(l) for l in learn.recorder.losses)
    fit(learn, 'fit_sgdr', 2, 1, 1e-2)   # cycles of 1 and 2 epochs (4 batches each): the lr restarts at batch 4
    lrs = learn.recorder.lrs
    assert len(lrs) == 12 and lrs[0] == pytest.approx(1e-2) and lrs[4] == pytest.approx(1e-2)
    assert lrs[1] > lrs[2] > lrs[3] and lrs[5] > lrs[8] > lrs[11] and lrs[3] < lrs[4]

def test_lr_find(opt_func):
    learn = learner(opt_func)
    w0 = [p.detach().clone() for p in learn.model.parameters()]
    with learn.no_logging(): res = learn.lr_find(num_it=30, show_plot=False)
    assert res.valley > 0
    for a, b in zip(learn.model.parameters(), w0): assert torch.equal(a, b)   # lr_find restores the model

def test_freeze_unfreeze_discriminative(opt_func):
    learn = learner(opt_func)
    learn.freeze()
    w0 = learn.model[0].weight.detach().clone()
    fit(learn, 'fit', 1, 1e-2)
    assert torch.equal(learn.model[0].weight, w0)
    learn.unfreeze()
    fit(learn, 'fit', 1, slice(1e-4, 1e-2))
    assert not torch.equal(learn.model[0].weight, w0)
    lrs = [pg['lr'] for pg in learn.opt.opt.param_groups]
    assert lrs[0] == pytest.approx(1e-4) and lrs[-1] == pytest.approx(1e-2)

def test_wd_bn_bias_false(opt_func):
    "With zero gradients only weights decay: BN parameters and biases must not move"
    learn = learner(opt_func, wd=0.5, wd_bn_bias=False)
    learn.create_opt(); learn.opt.set_hyper('lr', 0.1)
    m = learn.model
    no_wd = [m[0].bias, m[1].weight, m[1].bias, m[3].bias]
    for p in no_wd: assert learn.opt.opt.state[p]['do_wd'] is False
    before = [p.detach().clone() for p in m.parameters()]
    for p in m.parameters(): p.grad = torch.zeros_like(p)
    learn.opt.step()
    for p, b in zip(m.parameters(), before):
        if any(p is q for q in no_wd): assert torch.equal(p, b)
        else: assert not torch.equal(p, b) and (p.abs() < b.abs() + 1e-12).all()

def test_save_load_with_opt_resumes_identically(opt_func, tmp_path):
    l1 = learner(opt_func, path=tmp_path)
    fit(l1, 'fit', 2, 1e-2)
    l1.save('ck', with_opt=True)
    l2 = learner(opt_func, seed=1, path=tmp_path)
    l2.load('ck', with_opt=True)
    for l in (l1, l2):   # same shuffling for both continuations (fastai DataLoaders keep their own RNG)
        set_seed(7); l.dls.train.rng = random.Random(7); fit(l, 'fit', 2, 1e-2)
    for a, b in zip(l1.model.parameters(), l2.model.parameters()): assert torch.equal(a, b)

class CPUMixedPrecision(MixedPrecision):
    "fastai's MixedPrecision with a CPU GradScaler, and an inf injected into one gradient at training step `bad`"
    def __init__(self, bad=3): super().__init__(); self.bad = bad
    def before_fit(self):
        super().before_fit()
        self.autocast = autocast('cpu', enabled=False)
        self.learn.scaler = GradScaler('cpu', init_scale=2.**10)
        self.snap = None
    def after_backward(self):
        if self.training and self.learn.train_iter == self.bad:
            self.learn.model[0].weight.grad[0, 0] = float('inf')
            self.snap = ([p.detach().clone() for p in self.model.parameters()],
                         {id(p): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()} for p, s in self.opt.opt.state.items()})

def test_to_fp16_grad_scaler_skip(opt_func):
    "On CPU fastai's to_fp16 runs (autocast/GradScaler('cuda') disable themselves); the skip path is tested with a CPU GradScaler"
    learn = learner(opt_func).to_fp16()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore'); fit(learn, 'fit', 1, 1e-2)
    assert all(math.isfinite(l) for l in learn.recorder.losses)
    class Check(Callback):
        order = 20
        def after_step(self): pass
        def after_cancel_step(self):
            mp = self.learn.cpu_mixed_precision
            ws, st = mp.snap
            for p, w in zip(self.model.parameters(), ws): assert torch.equal(p, w)
            for p, s in self.opt.opt.state.items():
                for k, v in st[id(p)].items():
                    assert (torch.equal(s[k], v) if torch.is_tensor(v) else s[k] == v), k
            self.checked = True
    learn = learner(opt_func, cbs=[CPUMixedPrecision(bad=3), Check()])
    fit(learn, 'fit', 1, 1e-2)
    assert getattr(learn.check, 'checked', False), "the injected inf step was not skipped"
    assert all(math.isfinite(float(p.sum())) for p in learn.model.parameters())

def test_to_bf16(opt_func):
    learn = learner(opt_func).to_bf16()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore'); fit(learn, 'fit', 1, 1e-2)
    assert all(math.isfinite(l) for l in learn.recorder.losses)
    # real bf16 autocast on CPU: state stays fp32 with fp32 master weights
    class CPUbf16(Callback):
        def before_batch(self): self.ac = autocast('cpu', dtype=torch.bfloat16); self.ac.__enter__()
        def after_loss(self): self.ac.__exit__(None, None, None)
    learn = learner(opt_func, cbs=CPUbf16())
    fit(learn, 'fit', 1, 1e-2)
    assert all(math.isfinite(l) for l in learn.recorder.losses)
    for s in learn.opt.opt.state.values():
        for v in s.values():
            if torch.is_tensor(v) and v.is_floating_point() and v.dim() > 0: assert v.dtype == torch.float32

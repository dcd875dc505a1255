"""Every bad input ends with a clear message naming the problem: through the CLI (`python -m fastai_ranger.train`,
exit status 1, no traceback) where the CLI can express it, through the API otherwise."""
import json, shutil, sys
from pathlib import Path
import pytest, torch
from conftest import child_env, run_all
from fastai_ranger.registry import OPTS
from torch import nn

SMALL = ['--size', '32', '--bs', '4', '--epochs', '1', '--workers', '0', '--device', 'cpu', '--quiet']

def _small_copy(mini:Path, dst:Path, n_cls=5, n_train=2, n_val=1) -> Path: # 5 classes: the CLI reports top-5 accuracy
    "A tiny folder in the official layout, copied from the real mini dataset"
    for split,n in (('train',n_train),('val',n_val)):
        for c in sorted(o for o in (mini/split).iterdir() if o.is_dir())[:n_cls]:
            (dst/split/c.name).mkdir(parents=True)
            for f in sorted(c.iterdir())[:n]: shutil.copy(f, dst/split/c.name/f.name)
    return dst

@pytest.fixture(scope='module')
def cli(tmp_path_factory, mini):
    "Run every CLI case at once (the cost is mostly Python start-up), return {case: (returncode, output, out_dir)}"
    d = tmp_path_factory.mktemp('bad')
    flat = d/'flat'; flat.mkdir() # images but no train/ and val/ folders
    for f in sorted((mini/'train').rglob('*.JPEG'))[:3]: shutil.copy(f, flat/f.name)
    corrupt = _small_copy(mini, d/'corrupt')
    bad = sorted((corrupt/'train').rglob('*.JPEG'))[1]
    bad.write_bytes(bad.read_bytes()[:200]) # truncated download
    trunc = _small_copy(mini, d/'trunc')
    bad_tail = sorted((trunc/'val').rglob('*.JPEG'))[0]
    bad_tail.write_bytes(bad_tail.read_bytes()[:len(bad_tail.read_bytes())//2]) # header intact, pixels missing
    skip = _small_copy(mini, d/'skip')
    bad_skip = sorted((skip/'train').rglob('*.JPEG'))[1]
    bad_skip.write_bytes(b'this is not a JPEG')
    cases = {
        'missing':   ['--recipe', 'mini-quick', '--data', str(d/'nope'), *SMALL],
        'layout':    ['--recipe', 'mini-quick', '--data', str(flat), *SMALL],
        'corrupt':   ['--recipe', 'mini-quick', '--data', str(corrupt), *SMALL],
        'truncated': ['--recipe', 'mini-quick', '--data', str(trunc), *SMALL],
        'skip_bad':  ['--recipe', 'mini-quick', '--data', str(skip), '--skip-bad', *SMALL, '--bs', '3'], # 9 good images: 3 full batches
        'recipe':    ['--recipe', 'imagenete-128-5'],
        'lr':        ['--recipe', 'sample-quick', '--lr', '-1', *SMALL],
        'mom':       ['--recipe', 'sample-quick', '--mom', '1.5', *SMALL],
        'nan_loss':  ['--recipe', 'sample-quick', '--lr', '1e30', '--max-train-batches', '3', '--max-valid-batches', '1', *SMALL],
    }
    cmds = {k:[sys.executable, '-m', 'fastai_ranger.train', *args, '--out', d/f'out_{k}'] for k,args in cases.items()}
    res = {k:(rc, out, d/f'out_{k}') for k,(rc,out,_) in run_all(cmds, child_env(), timeout=300, merge=True).items()}
    res['_files'] = dict(bad=bad, bad_tail=bad_tail, bad_skip=bad_skip, missing=d/'nope', flat=flat)
    return res

def _err(res, case):
    rc,out,_ = res[case]
    assert rc == 1, f"{case}: exit status {rc}\n{out[-3000:]}"
    assert 'Traceback' not in out, f"{case}: a traceback instead of a message\n{out[-3000:]}"
    lines = [l for l in out.splitlines() if l.startswith('error:')]
    assert lines, f"{case}: no 'error:' line\n{out[-3000:]}"
    return out[out.index('error:'):]

def test_missing_folder(cli):
    msg = _err(cli, 'missing')
    assert str(cli['_files']['missing']) in msg and 'does not exist' in msg, msg

def test_wrong_layout(cli):
    msg = _err(cli, 'layout')
    assert str(cli['_files']['flat']) in msg and 'train/' in msg and 'val/' in msg, msg

def test_corrupt_image_named(cli):
    msg = _err(cli, 'corrupt')
    assert str(cli['_files']['bad']) in msg, msg
    assert '--skip-bad' in msg, msg

def test_truncated_image_named(cli):
    "A JPEG whose header is fine but whose data stops halfway fails when it is decoded, naming the file"
    msg = _err(cli, 'truncated')
    assert str(cli['_files']['bad_tail']) in msg, msg

def test_corrupt_image_skipped_with_warning(cli):
    rc,out,d = cli['skip_bad']
    assert rc == 0, out[-3000:]
    assert 'Skipping 1 unreadable image' in out and str(cli['_files']['bad_skip']) in out, out[-3000:]
    res = json.loads((d/'results.json').read_text())
    assert res['source']['skipped_bad'] == 1
    assert res['runs'][0]['epochs_done'] == 1 and res['runs'][0]['epochs'][0]['train_images'] == 9 # 10 minus the bad one

def test_unknown_recipe_suggests(cli):
    msg = _err(cli, 'recipe')
    assert "imagenete-128-5" in msg and 'did you mean' in msg and 'imagenette-128-5' in msg, msg

def test_invalid_hyperparameters(cli):
    msg = _err(cli, 'lr'); assert 'Invalid lr: -1.0' in msg, msg
    msg = _err(cli, 'mom'); assert 'Invalid mom: 1.5' in msg, msg
    for k in ('lr','mom'): assert not (cli[k][2]/'config.json').exists(), "an invalid run must not start"

def test_nonfinite_loss_cli(cli):
    msg = _err(cli, 'nan_loss')
    assert 'NonFiniteLossError: Non-finite loss' in msg and 'epoch 0/1, training iteration' in msg, msg
    assert 'Exception occured' not in msg, msg


# --- API level -----------------------------------------------------------------------------------------------------

def _tiny_learner(opt_func, cbs):
    from fastai.data.load import DataLoader
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner
    import fastai.callback.progress # Learner.no_bar
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    items = [(x,y) for x,y in zip(torch.randn(48, 6, generator=g), torch.randint(0, 3, (48,), generator=g))]
    dls = DataLoaders(DataLoader(items[:32], bs=8, shuffle=True), DataLoader(items[32:], bs=16))
    return Learner(dls, nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)), loss_func=nn.CrossEntropyLoss(),
                   opt_func=opt_func, cbs=cbs)

def test_nonfinite_loss_keeps_last_good_checkpoint(tmp_path):
    "A NaN loss in epoch 1 stops training with epoch/iteration in the message; the checkpoint of epoch 0 survives"
    from fastai.callback.core import Callback
    from fastai_ranger.checkpoint import CheckpointCallback, NonFiniteLossCallback, NonFiniteLossError, load_checkpoint
    try: from fastai_ranger.ranger import ranger as opt_func
    except ImportError: from fastai.optimizer import ranger as opt_func
    class Poison(Callback):
        order = -10
        def after_loss(self):
            if self.training and self.epoch == 1 and self.iter == 3: self.learn.loss_grad = self.learn.loss = self.loss*float('inf')
    learn = _tiny_learner(opt_func, [CheckpointCallback(tmp_path), Poison(), NonFiniteLossCallback()])
    with learn.no_bar(), learn.no_logging():
        with pytest.raises(NonFiniteLossError) as ei: learn.fit(3, 1e-2)
    msg = str(ei.value)
    assert msg.startswith('Non-finite loss (inf) at epoch 1/3, training iteration 3/4'), msg
    assert str(tmp_path/'last.pth') in msg, msg
    c = torch.load(tmp_path/'last.pth', weights_only=True)
    assert c['epoch'] == 1
    assert all(p.detach().isfinite().all() for p in learn.model.parameters())
    fresh = _tiny_learner(opt_func, [CheckpointCallback(tmp_path)])
    assert load_checkpoint(fresh, tmp_path) == 1

OURS = [s for s in OPTS.values() if s.ours] # every optimizer of this package, from the registry

def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2))

def _grads(n):
    g = torch.Generator().manual_seed(1)
    return [[torch.randn(p.shape, generator=g) for p in _model().parameters()] for _ in range(n)]

def _step(opt, model, grads):
    for p,gr in zip(model.parameters(), grads): p.grad = gr.clone()
    opt.step()

def _state_tensors(opt):
    return {f"{i}/{k}": v.clone() for i,s in enumerate(opt.state_dict()['state'].values()) for k,v in s.items() if torch.is_tensor(v)}

@pytest.mark.parametrize('spec', OURS, ids=[s.name for s in OURS])
def test_nonfinite_grad_skip(spec):
    "With nonfinite='skip' a NaN/inf gradient step is a no-op: the run equals the same run without that step"
    C = spec.cls()
    gs = _grads(7)
    ma,mb = _model(),_model()
    oa,ob = C(ma.parameters(), lr=1e-2, nonfinite='skip'),C(mb.parameters(), lr=1e-2, nonfinite='skip')
    for g in gs[:5]: _step(oa, ma, g); _step(ob, mb, g)
    before = _state_tensors(oa)
    bad = [g.clone() for g in gs[5]]; bad[0][0,0] = float('nan'); bad[2][1] = float('inf')
    with pytest.warns(UserWarning, match='non-finite gradient'): _step(oa, ma, bad)
    after = _state_tensors(oa)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before), \
        "a skipped step changed the optimizer state (step counts, moments or slow weights)"
    for g in gs[5:]: _step(oa, ma, g); _step(ob, mb, g) # crosses Lookahead's k=6 sync
    for pa,pb in zip(ma.parameters(), mb.parameters()): assert torch.equal(pa, pb), "skipped step left a trace"
    sa,sb = _state_tensors(oa),_state_tensors(ob)
    assert all(torch.equal(sa[k], sb[k]) and sa[k].isfinite().all() for k in sa)

@pytest.mark.parametrize('spec', OURS, ids=[s.name for s in OURS])
def test_nonfinite_grad_raise(spec):
    "With nonfinite='raise' a NaN gradient raises NonFiniteGradientError and touches nothing"
    from fastai_ranger.core import NonFiniteGradientError
    C = spec.cls()
    gs = _grads(3)
    m = _model()
    o = C(m.parameters(), lr=1e-2, nonfinite='raise')
    for g in gs[:2]: _step(o, m, g)
    w,st = [p.detach().clone() for p in m.parameters()],_state_tensors(o)
    bad = [g.clone() for g in gs[2]]; bad[1][0] = float('nan')
    with pytest.raises(NonFiniteGradientError, match='non-finite gradient'): _step(o, m, bad)
    assert all(torch.equal(a, p) for a,p in zip(w, m.parameters()))
    st2 = _state_tensors(o); assert all(torch.equal(st[k], st2[k]) for k in st)

def test_nonfinite_mode_validated():
    from fastai_ranger.ranger import Ranger as C
    with pytest.raises(ValueError, match='Invalid nonfinite'): C(_model().parameters(), nonfinite='ignore')

def test_resume_errors(tmp_path):
    "Resuming from a folder without a checkpoint, or into a different model, says so"
    from fastai_ranger.checkpoint import load_checkpoint, CheckpointCallback, CheckpointError
    from fastai.optimizer import Adam
    with pytest.raises(FileNotFoundError, match='No checkpoint at'): load_checkpoint(_tiny_learner(Adam, []), tmp_path)
    l = _tiny_learner(Adam, [CheckpointCallback(tmp_path)])
    with l.no_bar(), l.no_logging(): l.fit(1)
    other = _tiny_learner(Adam, []); other.model[2] = nn.Linear(16, 4)
    with pytest.raises(RuntimeError, match='does not fit this model'): load_checkpoint(other, tmp_path)
    (tmp_path/'junk.pth').write_bytes(b'not a checkpoint')
    with pytest.raises(CheckpointError, match=r'junk.pth is not a readable checkpoint \(truncated or corrupt: not a complete `torch.save` archive\)'):
        load_checkpoint(_tiny_learner(Adam, []), tmp_path/'junk.pth')

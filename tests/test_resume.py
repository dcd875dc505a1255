"Kill-and-resume: a real training process is killed with SIGKILL mid-epoch, resumed, and must end bitwise equal to an uninterrupted run"
import json, os, re, signal, subprocess, sys, textwrap, time
from pathlib import Path
import pytest, torch
from conftest import child_env, flat_tensors
from fastai_ranger.registry import OPTS as REGISTRY

pytestmark = pytest.mark.skipif(sys.platform == 'win32', reason='needs POSIX signals')

# A small training script: synthetic 32 px images, a tiny CNN, deterministic CPU settings, fastai Learner with the
# package's CheckpointCallback. It prints one flushed line per training batch so the test knows where it is, and
# sleeps a little per batch so that a kill lands inside an epoch.
SCRIPT = textwrap.dedent('''
    import sys, time, random, importlib, argparse
    import numpy as np, torch
    from torch import nn
    from fastai.data.load import DataLoader
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner
    from fastai.callback.core import Callback
    from fastai.callback.schedule import *
    from fastai_ranger.checkpoint import CheckpointCallback, load_checkpoint, _plain

    p = argparse.ArgumentParser()
    p.add_argument('--opt'); p.add_argument('--out'); p.add_argument('--resume', default=None)
    p.add_argument('--epochs', type=int, default=3); p.add_argument('--seed', type=int, default=42)
    p.add_argument('--sleep', type=float, default=0.)
    a = p.parse_args()
    torch.set_num_threads(1); torch.use_deterministic_algorithms(True)
    torch.manual_seed(a.seed); random.seed(a.seed); np.random.seed(a.seed)
    mod,name = a.opt.split(':')
    opt_func = getattr(importlib.import_module(mod), name)

    g = torch.Generator().manual_seed(0)
    xs,ys = torch.randn(160, 3, 32, 32, generator=g),torch.randint(0, 10, (160,), generator=g)
    items = [(x,y) for x,y in zip(xs,ys)]
    def aug(o):
        x,y = o
        if random.random() < 0.5: x = x.flip(-1)
        return x + 0.05*torch.randn_like(x), y
    dls = DataLoaders(DataLoader(items[:128], bs=16, shuffle=True, drop_last=True, after_item=aug),
                      DataLoader(items[128:], bs=32))
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.1), nn.Linear(16, 10))

    class BatchLog(Callback):
        order = 99
        def after_batch(self):
            if not self.training: return
            print(f"BATCH epoch={self.epoch} iter={self.iter}", flush=True)
            time.sleep(a.sleep)

    learn = Learner(dls, model, loss_func=nn.CrossEntropyLoss(), opt_func=opt_func,
                    cbs=[CheckpointCallback(a.out), BatchLog()])
    start = load_checkpoint(learn, a.resume) if a.resume else 0
    with learn.no_bar(): learn.fit_one_cycle(a.epochs, 3e-3, start_epoch=start)
    torch.save(_plain({'model': learn.model.state_dict(), 'opt': learn.opt.state_dict(), 'lrs': learn.recorder.lrs,
                'values': [list(v) for v in learn.recorder.values]}), f"{a.out}/final.pth")
    print("DONE", flush=True)
''')

OPTS = [':'.join(s.opt_func.rsplit('.', 1)) for s in REGISTRY.values() if s.ours] # module:opt_func of each of our optimizers
EPOCHS, KILL_EPOCH = 3, 1 # B is killed in epoch KILL_EPOCH (0-based), after the checkpoint of epoch KILL_EPOCH-1


def _ckpt_epoch(d):
    f = Path(d)/'last.pth'
    return torch.load(f, weights_only=True)['epoch'] if f.exists() else None

def _run(cmd, timeout=120):
    r = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return r

def _kill_mid_epoch(cmd, epoch, it=2, timeout=120):
    "Start `cmd`, SIGKILL it when it reports training batch `it` of `epoch`; returns the killed process"
    p = subprocess.Popen(cmd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    try:
        for line in p.stdout:
            if line.strip() == f"BATCH epoch={epoch} iter={it}":
                os.kill(p.pid, signal.SIGKILL); break
            if time.time()-t0 > timeout: raise TimeoutError(f"no batch {it} of epoch {epoch} within {timeout}s")
        else: raise AssertionError(f"process ended without reaching epoch {epoch}:\n{p.stderr.read()[-3000:]}")
        p.wait(30)
    finally:
        if p.poll() is None: p.kill(); p.wait()
    assert p.returncode == -signal.SIGKILL, p.returncode
    return p

def _assert_same_final(da, db):
    fa,fb = torch.load(Path(da)/'final.pth', weights_only=True),torch.load(Path(db)/'final.pth', weights_only=True)
    for k,v in fa['model'].items(): assert torch.equal(v, fb['model'][k]), f"weights differ after resume: {k}"
    ta,tb = dict(flat_tensors(fa['opt'])),dict(flat_tensors(fb['opt']))
    assert ta.keys() == tb.keys()
    for k in ta: assert torch.equal(ta[k], tb[k]), f"optimizer state differs after resume: {k}"
    assert fa['lrs'] == fb['lrs'], "learning-rate schedule differs after resume"
    assert fa['values'] == fb['values'], "recorded metrics differ after resume"


@pytest.mark.parametrize('opt', OPTS)
def test_kill_and_resume_script(opt, tmp_path):
    script = tmp_path/'train.py'; script.write_text(SCRIPT)
    da,db = tmp_path/'a',tmp_path/'b'
    base = [sys.executable, str(script), '--opt', opt, '--epochs', str(EPOCHS)]
    _run(base + ['--out', str(da)])
    assert _ckpt_epoch(da) == EPOCHS
    _kill_mid_epoch(base + ['--out', str(db), '--sleep', '0.05'], KILL_EPOCH)
    # killed inside epoch KILL_EPOCH: the last checkpoint is the one of the epoch before, and it loads cleanly
    assert _ckpt_epoch(db) == KILL_EPOCH
    assert not (db/'final.pth').exists()
    _run(base + ['--out', str(db), '--resume', str(db)])
    _assert_same_final(da, db)


def test_kill_during_save_keeps_previous(tmp_path):
    "A process killed while `atomic_torch_save` is writing leaves the previous checkpoint readable"
    code = textwrap.dedent(f'''
        import os, signal, torch
        from fastai_ranger.checkpoint import atomic_torch_save
        atomic_torch_save({{'epoch': 1, 'w': torch.ones(3)}}, {str(tmp_path/'last.pth')!r})
        class Kill:
            def __reduce__(self): os.kill(os.getpid(), signal.SIGKILL)
        atomic_torch_save({{'epoch': 2, 'w': torch.zeros(1_000_000), 'k': Kill()}}, {str(tmp_path/'last.pth')!r})
    ''')
    r = subprocess.run([sys.executable, '-c', code], env=child_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == -signal.SIGKILL, r.stderr
    c = torch.load(tmp_path/'last.pth', weights_only=True)
    assert c['epoch'] == 1 and torch.equal(c['w'], torch.ones(3))


# The real CLI: `fastai-ranger-train` on the generated sample at 32 px, deterministic CPU settings. Run B is killed
# when fastprogress shows training batch 2 of epoch KILL_EPOCH (so: after the checkpoint of the epoch before, in the
# middle of this one), then continued with `--resume`.
NB,CLI_EPOCHS = 4,2 # training batches per epoch, epochs (killed in epoch KILL_EPOCH=1, the last)
CLI_ARGS = ['--recipe', 'sample-quick', '--size', '32', '--bs', '16', '--epochs', str(CLI_EPOCHS), '--workers', '0',
            '--seed', '0', '--deterministic', '--max-train-batches', str(NB), '--max-valid-batches', '1',
            '--device', 'cpu']

def _cli(*args): return [sys.executable, '-m', 'fastai_ranger.train', *CLI_ARGS, *args]

def _kill_on_output(cmd, pattern, timeout=180):
    "Start `cmd`, SIGKILL it as soon as its (unbuffered) output matches `pattern`"
    p = subprocess.Popen(cmd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    buf,t0,rx = b'',time.time(),re.compile(pattern.encode())
    try:
        while True:
            chunk = p.stdout.read1(4096) if hasattr(p.stdout, 'read1') else os.read(p.stdout.fileno(), 4096)
            if not chunk: raise AssertionError(f"process ended before {pattern!r}:\n{buf[-3000:].decode(errors='replace')}")
            buf += chunk
            if rx.search(buf[-20000:]):
                os.kill(p.pid, signal.SIGKILL); break
            if time.time()-t0 > timeout: raise TimeoutError(f"{pattern!r} not seen within {timeout}s")
        p.wait(30)
    finally:
        if p.poll() is None: p.kill(); p.wait()
    assert p.returncode == -signal.SIGKILL, p.returncode
    return buf.decode(errors='replace')

def test_kill_and_resume_cli(tmp_path):
    da,db = tmp_path/'a',tmp_path/'b'
    _run(_cli('--opt', 'ranger', '--out', str(da), '--quiet'), timeout=180)
    _kill_on_output(_cli('--opt', 'ranger', '--out', str(db)),
                    rf"Epoch {KILL_EPOCH+1}/{CLI_EPOCHS} : \|[^\r\n]*\[2/{NB} ")
    assert _ckpt_epoch(db/'run0') == KILL_EPOCH, "the kill did not land inside the epoch after the checkpoint"
    assert not (db/'results.json').exists()
    _run([sys.executable, '-m', 'fastai_ranger.train', '--resume', str(db), '--quiet'], timeout=180)
    ea,eb = [[json.loads(l) for l in (d/'run0'/'epochs.jsonl').read_text().splitlines()] for d in (da,db)]
    keys = ('train_loss','valid_loss','accuracy')
    assert [ea[0][k] for k in keys] == [eb[0][k] for k in keys], \
        "two runs with the same --seed already differ in epoch 0, before any kill/resume: the run itself is not reproducible"
    assert [[e[k] for k in keys] for e in ea] == [[e[k] for k in keys] for e in eb], "per-epoch metrics differ after resume"
    ca,cb = torch.load(da/'run0'/'last.pth', weights_only=True),torch.load(db/'run0'/'last.pth', weights_only=True)
    assert ca['epoch'] == cb['epoch'] == CLI_EPOCHS
    for k,v in ca['model'].items(): assert torch.equal(v, cb['model'][k]), f"weights differ after resume: {k}"
    ta,tb = dict(flat_tensors(ca['opt'])),dict(flat_tensors(cb['opt']))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), "optimizer state differs after resume"
    assert ca['recorder']['lrs'] == cb['recorder']['lrs'], "learning-rate schedule differs after resume"
    ra,rb = json.loads((da/'results.json').read_text()),json.loads((db/'results.json').read_text())
    assert ra['summary']['accuracy_mean'] == rb['summary']['accuracy_mean']
    assert rb['runs'][0]['resumed_from'] == KILL_EPOCH and rb['runs'][0]['epochs_done'] == CLI_EPOCHS

"""The edges of a run: a run stopped after its last checkpoint, checkpoints that are not the run's, stuck folders,
a batch larger than the data, two processes on one folder, a full disk and Ctrl-C during a checkpoint write. The
folder cases call `train_recipe` in this process (fast); what needs a real process (exit status, one-line message, signals,
a lock held by another process) goes through the CLI."""
import json, os, shutil, sys, textwrap
from conftest import child_env, run_all
import pytest, torch

pytestmark = pytest.mark.skipif(sys.platform == 'win32', reason='needs POSIX signals and fcntl')

TINY = dict(epochs=1, arch='xresnet18', size=32, bs=4, workers=0, max_train_batches=2, max_valid_batches=1, device='cpu', seed=0)
CLI_TINY = ['--recipe', 'sample-quick', '--data', 'sample', '--arch', 'xresnet18', '--epochs', '1', '--size', '32', '--bs', '4', '--workers', '0',
            '--max-train-batches', '2', '--max-valid-batches', '1', '--device', 'cpu', '--seed', '0', '--quiet']

@pytest.fixture(scope='module')
def tmp(tmp_path_factory):
    d = tmp_path_factory.mktemp('edges')
    old = os.environ.get('FASTAI_RANGER_SAMPLE')
    os.environ['FASTAI_RANGER_SAMPLE'] = str(d/'samples')
    yield d
    if old is None: os.environ.pop('FASTAI_RANGER_SAMPLE', None)
    else: os.environ['FASTAI_RANGER_SAMPLE'] = old

def _train(**kw):
    from fastai_ranger.train import train_recipe
    return train_recipe('sample-quick', quiet=True, **{**TINY, **kw})

@pytest.fixture(scope='module')
def base(tmp):
    "Two finished 1-epoch runs: Ranger and RangerLARS"
    return dict(ranger=(tmp/'ranger', _train(out=tmp/'ranger')), lars=(tmp/'lars', _train(out=tmp/'lars', opt='ranger_lars')))

def _copy(base, name, tmp, unfinish=True):
    "A copy of a base run; with `unfinish`, as if killed after its last checkpoint, before its results"
    d = tmp/name
    shutil.copytree(base['ranger'][0], d)
    if unfinish: (d/'run0'/'result.json').unlink(); (d/'results.json').unlink()
    return d

def _resume(d, **kw):
    from fastai_ranger.train import train_recipe
    return train_recipe(resume=d, quiet=True, **kw)

def _tamper(d, f):
    c = torch.load(d/'run0'/'last.pth', weights_only=True)
    torch.save(f(c), d/'run0'/'last.pth')

# --- a run stopped after its last checkpoint ------------------------------------------------------------------------

def test_finish_after_last_checkpoint(base, tmp):
    "Killed between the final last.pth and result.json: --resume writes the results without training"
    acc = base['ranger'][1]['summary']['accuracy_mean']
    d = _copy(base, 'finish', tmp)
    res = _resume(d)
    assert res['summary']['accuracy_mean'] == acc and res['runs'][0]['resumed_from'] == 1
    assert json.loads((d/'results.json').read_text())['summary']['accuracy_mean'] == acc
    d = _copy(base, 'finish_nolog', tmp) # epochs.jsonl lost too: the checkpoint's history has the metrics
    (d/'run0'/'epochs.jsonl').unlink()
    assert _resume(d)['summary']['accuracy_mean'] == acc

def test_checkpoint_beyond_the_run(base, tmp):
    d = _copy(base, 'beyond', tmp)
    _tamper(d, lambda c: {**c, 'epoch': 5})
    with pytest.raises(ValueError, match=r"epoch 5 is beyond the run's 1 epochs"): _resume(d)

# --- checkpoints that are not the run's -----------------------------------------------------------------------------

def test_other_optimizers_checkpoint_refused(base, tmp):
    d = _copy(base, 'foreign', tmp)
    shutil.copy(base['lars'][0]/'run0'/'last.pth', d/'run0'/'last.pth')
    with pytest.raises(ValueError, match=r"opt: 'ranger_lars' in the checkpoint, 'ranger' in this run"): _resume(d)
    _tamper(d, lambda c: {k:v for k,v in c.items() if k != 'meta'}) # a checkpoint without the run's description
    with pytest.raises(ValueError, match=r"optimizer: RangerLARS in the checkpoint, Ranger in this run"): _resume(d)

@pytest.mark.parametrize('name,tamper,msg', [
    ('epoch', lambda c: {**c, 'epoch': -1}, 'epoch -1 is not a number of completed epochs'),
    ('state', lambda c: {**c, 'opt': {**c['opt'], 'state': {k:v for k,v in c['opt']['state'].items() if k != 3}}},
     r'optimizer state missing for 1 parameter\(s\)'),
    ('shape', lambda c: {**c, 'opt': {**c['opt'], 'state': {**c['opt']['state'], 0: {**c['opt']['state'][0], 'exp_avg': torch.zeros(2)}}}},
     'optimizer state shape vs parameter shape'),
    ('nan', lambda c: {**c, 'model': {k:(v*float('nan') if v.is_floating_point() else v) for k,v in c['model'].items()}},
     'non-finite weights in'),
    ('seed', lambda c: {**c, 'meta': {**c['meta'], 'seed': 1}}, r"seed: 1 in the checkpoint, 0 in this run"),
])
def test_tampered_checkpoint_refused(base, tmp, name, tamper, msg):
    d = _copy(base, f'tamper_{name}', tmp)
    _tamper(d, tamper)
    with pytest.raises(ValueError, match=msg): _resume(d)

def test_unreadable_checkpoint(base, tmp):
    d = _copy(base, 'empty_ckpt', tmp)
    (d/'run0'/'last.pth').write_bytes(b'')
    with pytest.raises(ValueError, match=r'is empty \(0 bytes\)'): _resume(d)
    (d/'run0'/'last.pth').unlink(); (d/'run0'/'last.pth').mkdir()
    with pytest.raises(ValueError, match='is a directory, not a checkpoint file'): _resume(d)

# --- leftovers, permissions, flags ----------------------------------------------------------------------------------

def test_stale_tmp_removed_and_umask(base, tmp):
    f = base['ranger'][0]/'run0'/'last.pth'
    um = os.umask(0); os.umask(um)
    assert f.stat().st_mode & 0o777 == 0o666 & ~um, oct(f.stat().st_mode) # not mkstemp's 0600
    d = _copy(base, 'stale', tmp)
    (d/'run0'/'.last.pth.k1ll3d.tmp').write_bytes(b'half a checkpoint')
    _resume(d)
    assert not list((d/'run0').glob('.last.pth.*.tmp'))

def test_resume_flags(base, tmp):
    d = _copy(base, 'flags', tmp)
    with pytest.raises(ValueError, match=r'accepts --skip-bad, --workers, --device and --quiet, not --bs, --lr'): _resume(d, lr=0.1, bs=8)
    _resume(d, workers=0, device='cpu') # how the run executes may change

# --- stuck folders ---------------------------------------------------------------------------------------------------

def test_empty_config_folder_is_reusable(tmp):
    d = tmp/'cfg0'; d.mkdir()
    (d/'config.json').write_bytes(b'') # left by a full disk
    with pytest.raises(ValueError, match=r'config.json is empty or corrupt.*start the run again with --out'): _resume(d)
    res = _train(out=d)
    assert res['runs'][0]['epochs_done'] == 1 and json.loads((d/'config.json').read_text())['name'] == 'sample-quick'

def test_bad_image_then_skip_bad(tmp):
    "After a BadImageError, --skip-bad works on the same folder, both as a new run and with --resume"
    from fastai_ranger.data import get_sample, DataError
    data = tmp/'bad_data'
    shutil.copytree(get_sample(), data)
    bad = sorted((data/'train').rglob('*.*'))[-1]
    bad.write_bytes(b'this is not an image')
    kw = dict(data=str(data), max_train_batches=None)
    with pytest.raises(DataError, match='Cannot read image'): _train(out=tmp/'bad', **kw)
    assert (tmp/'bad'/'config.json').exists()
    shutil.copytree(tmp/'bad', tmp/'bad2')
    res = _train(out=tmp/'bad', skip_bad=True, **kw)
    assert res['source']['skipped_bad'] == 1
    res = _resume(tmp/'bad2', skip_bad=True)
    assert res['source']['skipped_bad'] == 1 and json.loads((tmp/'bad2'/'config.json').read_text())['skip_bad'] is True

def test_batch_larger_than_training_set(tmp):
    with pytest.raises(ValueError, match=r'Batch size 1000 is larger than the \d+ training images'):
        _train(out=tmp/'bigbs', bs=1000, max_train_batches=None)
    assert not (tmp/'bigbs'/'config.json').exists()

def test_out_is_a_file(tmp):
    (tmp/'afile').write_text('x')
    with pytest.raises(ValueError, match='is a file, not a folder'): _train(out=tmp/'afile')

@pytest.mark.skipif(hasattr(os, 'geteuid') and os.geteuid() == 0, reason='root writes to read-only folders')
def test_read_only_out(tmp):
    d = tmp/'ro'; d.mkdir(); d.chmod(0o555)
    try:
        with pytest.raises(ValueError, match='cannot write to --out'): _train(out=d)
    finally: d.chmod(0o755)

# --- through the CLI: lock, full disk, Ctrl-C during a checkpoint write ---------------------------------------------

# Runs the CLI with `torch.save` failing the way it does when the disk fills up (torch reports an `inline_container.cc`
# enforce failure whose context is the OSError) or receiving SIGINT in the middle of writing, at the 2nd checkpoint.
WRAP = textwrap.dedent('''
    import io, os, sys, errno, signal, runpy, torch
    mode = sys.argv.pop(1)
    orig,calls = torch.save,[0]
    class Writer(io.RawIOBase):
        def __init__(self, f): self.f,self.n = f,0
        def writable(self): return True
        def write(self, b):
            self.n += 1
            if self.n == 3:
                if mode == 'enospc': raise OSError(errno.ENOSPC, 'No space left on device')
                os.kill(os.getpid(), signal.SIGINT)
            return self.f.write(b)
    def save(obj, f, *a, **k):
        calls[0] += 1
        return orig(obj, Writer(f) if calls[0] == 2 else f, *a, **k)
    torch.save = save
    sys.argv[0] = 'fastai-ranger-train'
    runpy.run_module('fastai_ranger.train', run_name='__main__')
''')

def _env(tmp): return child_env(PYTHONWARNINGS='ignore', FASTAI_RANGER_SAMPLE=tmp/'samples')

@pytest.fixture(scope='module')
def cli(tmp):
    "Run the CLI cases concurrently; {case: (returncode, stdout, stderr, out_dir)}"
    (tmp/'wrap.py').write_text(WRAP)
    py = [sys.executable]
    cases = {
        'lock1':  py + ['-m', 'fastai_ranger.train', *CLI_TINY, '--runs', '2', '--out', str(tmp/'locked')],
        'lock2':  py + ['-m', 'fastai_ranger.train', *CLI_TINY, '--seed', '1', '--out', str(tmp/'locked')],
        'enospc': py + [str(tmp/'wrap.py'), 'enospc', *CLI_TINY, '--epochs', '2', '--out', str(tmp/'full')],
        'sigint': py + [str(tmp/'wrap.py'), 'sigint', *CLI_TINY, '--epochs', '2', '--out', str(tmp/'ctrlc')],
    }
    return run_all(cases, _env(tmp), timeout=600, stagger={'lock1': 0.5}) # the second run starts 0.5 s after the first

def _one_line_error(r, contains):
    rc,o,e = r
    assert rc == 1, (rc, o[-2000:], e[-3000:])
    assert 'Traceback' not in e, e[-3000:]
    lines = [l for l in e.splitlines() if l.startswith('error:')]
    assert len(lines) == 1 and contains in lines[0], e[-3000:]
    return lines[0]

def test_two_processes_on_one_out(cli, tmp):
    "Of two runs started 0.5 s apart on one folder exactly one trains; the other is refused in one line; the folder holds the winner's run only"
    runs = dict(lock1=(0, 2), lock2=(1, 1))   # (seed, runs) of each
    won = [k for k in runs if cli[k][0] == 0]
    assert len(won) == 1, {k: cli[k][2][-1500:] for k in runs}   # usually lock1: it starts first (imports take seconds, so not always)
    lost = [k for k in runs if k not in won][0]
    line = _one_line_error(cli[lost], 'error:')
    assert 'is in use by another training process (pid ' in line or 'already holds a run' in line, line
    res = json.loads((tmp/'locked'/'results.json').read_text())
    seed,n = runs[won[0]]
    assert res['config']['seed'] == seed and res['summary']['n'] == n
    for r in range(n): assert [json.loads(l)['epoch'] for l in (tmp/'locked'/f'run{r}'/'epochs.jsonl').read_text().splitlines()] == [0]

def test_disk_full_during_checkpoint(cli, tmp):
    f = tmp/'full'/'run0'/'last.pth'
    line = _one_line_error(cli['enospc'], 'no space left on device')
    assert f'the previous checkpoint {f} is intact' in line, line
    assert torch.load(f, weights_only=True)['epoch'] == 1
    assert not list(f.parent.glob('.last.pth.*.tmp'))

def test_ctrl_c_during_checkpoint(cli, tmp):
    rc,o,e = cli['sigint']
    assert rc == 130, (rc, e[-3000:])
    assert f"Continue with: fastai-ranger-train --resume {tmp/'ctrlc'}" in e and 'Traceback' not in e, e[-3000:]
    f = tmp/'ctrlc'/'run0'/'last.pth'
    assert torch.load(f, weights_only=True)['epoch'] == 1 and not list(f.parent.glob('.last.pth.*.tmp'))

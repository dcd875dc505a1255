"The training CLI end to end, in subprocesses: real images (mini Imagenette) and the generated sample, results checked for content"
import json, math, subprocess, sys
from pathlib import Path
import pandas as pd, pytest
from conftest import child_env, run_all
from PIL import Image

SCRIPT = Path(sys.executable).parent/'fastai-ranger-train'
TINY = ['--epochs','1','--size','32','--bs','16','--arch','xresnet18','--max-train-batches','3','--max-valid-batches','2',
        '--workers','0','--device','cpu','--quiet']

def run(args, tmp, **kw):
    "Run the CLI (`python -m fastai_ranger.train`, or the console script with `script=True`) and return the completed process"
    script = kw.pop('script', False)
    env = child_env(PYTHONWARNINGS='ignore', FASTAI_RANGER_SAMPLE=tmp/'samples')
    cmd = ([str(SCRIPT)] if script else [sys.executable, '-m', 'fastai_ranger.train']) + [str(a) for a in args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, **kw)

@pytest.fixture(scope='module')
def tmp(tmp_path_factory): return tmp_path_factory.mktemp('cli')

def _is_png(p:Path):
    assert p.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n', p
    with Image.open(p) as im: im.verify()
    with Image.open(p) as im: assert im.size[0] > 100 and im.size[1] > 100

def _check_results(out:Path, n_runs:int, source_kind:str, copy:str, epochs=1):
    df = pd.read_csv(out/'results.csv')
    for c in ['run','seed','accuracy','top5_accuracy','valid_loss','train_loss','epochs_done','wall_s','train_s','images_per_s',
              'precision','recipe','dataset','size','epochs','arch','opt','lr','bs','data_copy']: assert c in df.columns, c
    assert len(df) == n_runs and list(df.run) == list(range(n_runs)) and df.seed.nunique() == n_runs
    for c in ['accuracy','top5_accuracy','valid_loss','train_loss','wall_s','images_per_s']:
        assert df[c].map(math.isfinite).all(), c
    assert df.accuracy.between(0, 100).all() and (df.top5_accuracy >= df.accuracy).all() and (df.images_per_s > 0).all()
    assert (df.epochs_done == epochs).all() and (df.data_copy.astype(str) == copy).all()
    res = json.loads((out/'results.json').read_text())
    cfg = res['config']
    for k in ['name','dataset','size','epochs','arch','opt','lr','wd','bs','ls','mixup','sched','pct','precision','seed','runs']: assert k in cfg, k
    assert (cfg['size'], cfg['epochs'], cfg['arch'], cfg['comparable']) == (32, epochs, 'xresnet18', False)
    assert res['source']['kind'] == source_kind and res['source']['copy'] == copy and Path(res['source']['path']).exists()
    assert {'torch','fastai','fastai_ranger','python'} <= set(res['versions'])
    assert res['hardware']['cpus'] >= 1 and res['hardware']['device'] == 'cpu'
    s = res['summary']
    assert s['n'] == n_runs and math.isclose(s['accuracy_mean'], df.accuracy.mean(), rel_tol=1e-9)
    assert math.isclose(s['accuracy_sd'], df.accuracy.std(ddof=1) if n_runs > 1 else 0., abs_tol=1e-9)
    for r in res['runs']:
        assert len(r['epochs']) == epochs
        e = r['epochs'][-1]
        assert {'train_loss','valid_loss','accuracy','top_k_accuracy','time_s','images_per_s'} <= set(e)
        assert math.isclose(100*e['accuracy'], r['accuracy'])
        assert (out/f"run{r['run']}"/'last.pth').exists()
    saved = json.loads((out/'config.json').read_text())
    assert saved['arch'] == 'xresnet18' and saved['source']['kind'] == source_kind
    for p in ('loss.png','accuracy.png'): _is_png(out/p)
    return res

def test_real_images_two_runs(tmp, mini):
    out = tmp/'mini'
    p = run(['--recipe','mini-quick','--data',mini,'--runs','2','--out',out] + TINY, tmp)
    assert p.returncode == 0, p.stderr[-3000:]
    res = _check_results(out, 2, 'folder', '160')
    assert res['source']['n_train'] == 500 and res['source']['subset_train'] == 48
    assert 'mini-quick: accuracy' in p.stdout and '± ' in p.stdout and 'over 2 run(s)' in p.stdout

def test_sample_console_script_and_resume(tmp):
    out = tmp/'sample'
    p = run(['--recipe','sample-quick','--data','sample','--out',out,'--opt','adam','--lr','3e-3'] + TINY, tmp, script=True)
    assert p.returncode == 0, p.stderr[-3000:]
    res = _check_results(out, 1, 'sample', 'sample')
    assert res['config']['opt'] == 'adam' and res['config']['lr'] == 3e-3
    # the same --out again is refused; --resume reads the finished run back
    p2 = run(['--recipe','sample-quick','--out',out] + TINY, tmp)
    assert p2.returncode == 1 and '--resume' in p2.stderr and 'Traceback' not in p2.stderr
    acc = pd.read_csv(out/'results.csv').accuracy[0]
    p3 = run(['--resume',out,'--quiet'], tmp)
    assert p3.returncode == 0, p3.stderr[-3000:]
    assert pd.read_csv(out/'results.csv').accuracy[0] == acc

CASES = {
    'list':    ['--list'],
    'recipe':  ['--recipe','imagenete-128-5'],
    'prec':    ['--recipe','sample-quick','--fp16','--bf16'],
    'nothing': [],
    'nonfinite': ['--recipe','sample-quick','--opt','adam','--nonfinite','skip'],
    'device':  ['--recipe','sample-quick','--device','foo'],
    'gpu':     ['--recipe','sample-quick','--device','cuda:99'],
    'workers': ['--recipe','sample-quick','--workers','-1'],
}

@pytest.fixture(scope='module')
def quick(tmp):
    "Run the short CLI cases concurrently (their cost is Python start-up); {case: CompletedProcess-like (rc, stdout, stderr)}"
    cmds = {k:[sys.executable,'-m','fastai_ranger.train','--device','cpu',*a] for k,a in CASES.items()}
    return run_all(cmds, child_env(PYTHONWARNINGS='ignore'), timeout=300)

def test_list(quick):
    rc,out,err = quick['list']
    assert rc == 0, err[-2000:]
    for n in ['imagenette-128-5','imagewoof-256-200','imagenette-192-20-adan','imagewoof-128-5-ranger_lars','sample-quick']:
        assert n in out, n
    assert '87.43' in out and '88.58' in out

@pytest.mark.parametrize('case,msg', [('recipe','did you mean imagenette-128-5'), ('prec','Choose one of'), ('nothing','Nothing to train'),
                                      ('nonfinite','has no non-finite gradient policy'), ('device',"Invalid device: 'foo'"),
                                      ('gpu',"Invalid device: 'cuda:99'"), ('workers','Invalid workers: -1')])
def test_bad_input(quick, case, msg):
    rc,out,err = quick[case]
    assert rc == 1, (rc, out[-2000:], err[-2000:])
    assert msg in err and 'Traceback' not in err and err.strip().startswith('error:'), err[-2000:]

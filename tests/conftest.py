"Shared fixtures of the pytest suites: the real mini dataset, the environment of child processes, one torch thread"
import os, subprocess, time
from pathlib import Path
import pytest, torch

ROOT = Path(__file__).resolve().parents[1]

def mini_path() -> Path:
    "The real 700-image Imagenette subset: `$FASTAI_RANGER_MINI`, else `../shared/data/imagenette2-160-mini` beside the repository"
    return Path(os.environ.get('FASTAI_RANGER_MINI') or ROOT.parent/'shared'/'data'/'imagenette2-160-mini')

@pytest.fixture(scope='session')
def mini() -> Path:
    "The real mini dataset; missing is a failure in CI (`CI` set) and a skip elsewhere"
    p = mini_path()
    if not (p/'train').is_dir():
        msg = f"real mini Imagenette not found at {p} (set FASTAI_RANGER_MINI)"
        if os.environ.get('CI'): pytest.fail(msg)
        pytest.skip(msg)
    return p

def child_env(**kw) -> dict:
    "Environment for a child Python process: this checkout importable, one CPU thread, no GPU, fixed hash seed, `kw` on top"
    env = dict(os.environ, OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='', PYTHONHASHSEED='0', PYTHONUNBUFFERED='1', MPLBACKEND='Agg')
    env.pop('FASTAI_RANGER_DEBUG', None)  # the CLI's one-line errors are under test, not tracebacks
    env.update({k:str(v) for k,v in kw.items()})
    env['PYTHONPATH'] = str(ROOT) + os.pathsep + env.get('PYTHONPATH', '')
    return env

def run_all(cmds:dict, # name -> command (list of arguments)
            env:dict, # Environment of every process
            timeout:float=600, # Seconds each may take
            stagger:dict=None, # name -> seconds to wait after starting that process
            merge:bool=False # stderr into stdout
           ) -> dict:
    "Start every command at once (their cost is mostly start-up), wait for all; {name: (returncode, stdout, stderr)}"
    err = subprocess.STDOUT if merge else subprocess.PIPE
    procs = {}
    for k,c in cmds.items():
        procs[k] = subprocess.Popen([str(o) for o in c], env=env, text=True, stdout=subprocess.PIPE, stderr=err)
        if stagger and k in stagger: time.sleep(stagger[k])
    res = {}
    try:
        for k,p in procs.items():
            out,err_ = p.communicate(timeout=timeout)
            res[k] = (p.returncode, out, err_)
    finally:
        for p in procs.values():
            if p.poll() is None: p.kill()
    return res

@pytest.fixture
def one_thread():
    "Run the test with one torch thread (bitwise-stable reductions), restoring the previous count after"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

def flat_tensors(o, pre=''):
    "(path, tensor) for every tensor (and number, as a tensor) in nested dicts/lists/tuples `o`"
    if isinstance(o, torch.Tensor): yield pre, o
    elif isinstance(o, dict):
        for k,v in o.items(): yield from flat_tensors(v, f"{pre}/{k}")
    elif isinstance(o, (list, tuple)):
        for i,v in enumerate(o): yield from flat_tensors(v, f"{pre}/{i}")
    elif isinstance(o, (int, float)) and not isinstance(o, bool): yield pre, torch.tensor(o)

"""Multi-process training through the real CLI entry point on CPU (gloo): `accelerate launch --multi_gpu` and
`torchrun` start 2 processes that train identical replicas into one result folder; a run whose rank 1 is killed
resumes with 2 processes to the same bits as the uninterrupted run; `accelerate launch --num_processes 2` without
`--multi_gpu` (which starts one process on a machine without GPUs) is refused instead of training alone."""
import json, os, signal, socket, subprocess, sys, time, uuid
from pathlib import Path
from conftest import child_env
import pytest, torch

pytestmark = pytest.mark.skipif(sys.platform == 'win32', reason='needs POSIX signals and /proc')

BIN = Path(sys.executable).parent
EPOCHS = 2
ARGS = ['-m', 'fastai_ranger.train', '--recipe', 'sample-quick', '--data', 'sample', '--size', '32', '--bs', '4',
        '--epochs', str(EPOCHS), '--workers', '0', '--seed', '0', '--deterministic', '--device', 'cpu']

def _port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]

def _env(tmp, tag=''):
    return child_env(PYTHONWARNINGS='ignore', FASTAI_RANGER_SAMPLE=tmp/'samples', FR_TEST_TAG=tag)

def _torchrun(*args, base=ARGS): return [sys.executable, '-m', 'torch.distributed.run', '--nnodes', '1', '--nproc_per_node', '2',
                                         '--master_addr', '127.0.0.1', '--master_port', str(_port()), *base, *args]
def _accelerate(*args, multi=True):
    return [str(BIN/'accelerate'), 'launch', *(['--multi_gpu'] if multi else []), '--num_processes', '2', '--num_machines', '1',
            '--mixed_precision', 'no', '--dynamo_backend', 'no', '--main_process_port', str(_port()), *ARGS, *args]

def _pids_with(tag, rank):
    "Processes whose environment holds FR_TEST_TAG=tag and RANK=rank (the launcher's workers)"
    out = []
    for p in Path('/proc').iterdir():
        if not p.name.isdigit(): continue
        try: env = set((p/'environ').read_bytes().split(b'\0'))
        except OSError: continue
        if f'FR_TEST_TAG={tag}'.encode() in env and f'RANK={rank}'.encode() in env: out.append(int(p.name))
    return out

def _ckpt(d): return torch.load(Path(d)/'run0'/'last.pth', weights_only=True)

def _epochs(d): return [json.loads(l) for l in (Path(d)/'run0'/'epochs.jsonl').read_text().splitlines()]

@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    "A: uninterrupted (accelerate launch --multi_gpu); B: torchrun, rank 1 SIGKILLed in epoch 2, then resumed with torchrun"
    tmp = tmp_path_factory.mktemp('mp')
    subprocess.run([sys.executable, '-c', 'from fastai_ranger.data import get_sample; get_sample()'], env=_env(tmp), check=True,
                   capture_output=True, timeout=300) # once, before the concurrent launches
    da,db = tmp/'a',tmp/'b'
    tag = uuid.uuid4().hex
    mism = subprocess.Popen(_accelerate('--out', str(tmp/'m'), multi=False), cwd=tmp, env=_env(tmp), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    pa = subprocess.Popen(_accelerate('--out', str(da), '--quiet'), cwd=tmp, env=_env(tmp), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    pb = subprocess.Popen(_torchrun('--out', str(db)), cwd=tmp, env=_env(tmp, tag), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs = [mism, pa, pb]
    try:
        t0 = time.time()
        while not (db/'run0'/'last.pth').exists(): # the checkpoint of epoch 1: kill rank 1 during epoch 2
            assert pb.poll() is None, "run B ended before its first checkpoint"
            assert time.time()-t0 < 300, "no checkpoint within 300 s"
            time.sleep(0.02)
        victims = _pids_with(tag, 1)
        assert victims, "rank 1 of run B not found"
        for pid in victims: os.kill(pid, signal.SIGKILL)
        pb.wait(120)
        out_m = mism.communicate(timeout=300)[0]
        out_a = pa.communicate(timeout=600)[0]
    finally:
        for p in procs:
            if p.poll() is None: p.kill(); p.wait()
    assert pa.returncode == 0, out_a[-4000:]
    assert pb.returncode != 0, "killing rank 1 did not stop run B"
    assert _ckpt(db)['epoch'] == 1 and not (db/'results.json').exists(), "the kill did not land inside epoch 2"
    pr = subprocess.run(_torchrun('-m', 'fastai_ranger.train', '--resume', str(db), '--quiet', base=[]),
                        cwd=tmp, env=_env(tmp), capture_output=True, text=True, timeout=600)
    assert pr.returncode == 0, pr.stdout[-3000:] + pr.stderr[-3000:]
    return dict(tmp=tmp, a=da, b=db, out_a=out_a, out_resume=pr.stdout + pr.stderr, mismatch=(mism.returncode, out_m))

def test_two_processes_one_folder_identical_replicas(runs):
    from fastai_ranger.train import state_digest
    da,out = runs['a'],runs['out_a']
    res = json.loads((da/'results.json').read_text())
    assert res['hardware']['world_size'] == 2
    r = json.loads((da/'run0'/'result.json').read_text())
    rep = r['replicas']
    assert rep['processes'] == 2 and rep['identical'] and len(set(rep['digests'])) == 1, rep
    c = _ckpt(da)
    assert c['epoch'] == EPOCHS and c['world_size'] == 2 and len(c['rng_ranks']) == 2
    assert state_digest(c['model'], c['opt']) == rep['digests'][0], "the digests do not describe the saved state"
    # one result folder, written once: only rank 0 creates, writes and prints
    assert sorted(p.name for p in runs['tmp'].iterdir() if p.name != 'samples') == ['a', 'b'], list(runs['tmp'].iterdir())
    assert sorted(p.name for p in da.iterdir()) == ['.lock', 'accuracy.png', 'config.json', 'loss.png', 'results.csv', 'results.json', 'results.md', 'run0']
    assert out.count('recipe sample-quick:') == 1 and out.count('results: ') == 1, out[-3000:]
    assert len(_epochs(da)) == EPOCHS

def test_kill_one_process_and_resume_bitwise(runs):
    da,db = runs['a'],runs['b']
    ca,cb = _ckpt(da),_ckpt(db)
    assert cb['epoch'] == EPOCHS
    for k,v in ca['model'].items(): assert torch.equal(v, cb['model'][k]), f"weights differ after resume: {k}"
    from fastai_ranger.train import state_digest
    assert state_digest(ca['model'], ca['opt']) == state_digest(cb['model'], cb['opt']), "optimizer state differs after resume"
    keys = ('train_loss','valid_loss','accuracy')
    assert [[e[k] for k in keys] for e in _epochs(da)] == [[e[k] for k in keys] for e in _epochs(db)]
    rb = json.loads((db/'run0'/'result.json').read_text())
    assert rb['resumed_from'] == 1 and rb['replicas']['identical']
    assert runs['out_resume'].count('resuming from the checkpoint after epoch 1') == 1, runs['out_resume'][-3000:]

def test_accelerate_without_multi_gpu_is_refused(runs):
    rc,out = runs['mismatch']
    assert rc != 0, out[-3000:]
    ours,_,launcher = out.partition('Traceback') # accelerate's launcher adds its own CalledProcessError traceback
    assert 'error: ValueError: accelerate launch was asked for 2 processes but started only this one' in ours, out[-3000:]
    assert '--multi_gpu' in ours and (not launcher or 'CalledProcessError' in launcher), out[-3000:]
    assert not (runs['tmp']/'m').exists()

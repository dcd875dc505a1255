"""Data-parallel training with 2 CPU processes (torch.distributed, gloo): replicas stay identical and match
single-process training on the same global batch, for Ranger, RangerLARS and Adan, through plain torch DDP and
through fastai's `distrib_ctx`."""
import socket, subprocess, sys, textwrap
import pytest, torch
from conftest import child_env, flat_tensors
from fastai_ranger.registry import OPTS

# Tolerance between the 2-process run and the single-process run on the same global batch. The gradients are the
# same average, summed in a different order (all-reduce of two half-batch means vs one full-batch mean), so they
# differ in the last float32 bits; 8 adaptive steps amplify that a little. Replicas among themselves must be bitwise
# equal (every rank applies the same deterministic update to the same all-reduced gradient).
RTOL, ATOL = 1e-5, 1e-6 # observed: max abs difference ~5e-8

WORKER = textwrap.dedent('''
    import os, sys, importlib, warnings
    import torch, torch.distributed as dist
    from torch import nn
    from fastai_ranger.checkpoint import _plain
    warnings.filterwarnings('ignore')
    torch.set_num_threads(1)
    out = sys.argv[1]
    rank,ws = int(os.environ.get('RANK', 0)),int(os.environ.get('WORLD_SIZE', 1))
    if ws > 1: dist.init_process_group('gloo')

    from fastai_ranger.registry import OPTS as REGISTRY
    OPTS = {'adamw': torch.optim.AdamW, # control: shows the harness itself is sound
            **{s.name: s.cls() for s in REGISTRY.values() if s.ours}}
    STEPS,GB = 8,16 # 8 steps: more than Lookahead's k=6, so one slow-weight sync happens

    def model():
        torch.manual_seed(1)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                             nn.Flatten(), nn.Linear(8*8*8, 5))

    g = torch.Generator().manual_seed(0)
    X,Y = torch.randn(STEPS*GB, 3, 8, 8, generator=g),torch.randint(0, 5, (STEPS*GB,), generator=g)

    res = {'init': model().state_dict()}
    for name,C in OPTS.items():
        m = model()
        net = nn.parallel.DistributedDataParallel(m) if ws > 1 else m
        opt = C(m.parameters(), lr=1e-2)
        per = GB//ws
        for s in range(STEPS): # rank r gets its slice of the global batch s
            sl = slice(s*GB + rank*per, s*GB + (rank+1)*per)
            loss = nn.functional.cross_entropy(net(X[sl]), Y[sl])
            opt.zero_grad(); loss.backward(); opt.step()
        res[name] = {'params': m.state_dict(), 'opt': opt.state_dict()}

    # fastai Learner + distrib_ctx (accelerate) on CPU
    from fastai.learner import Learner
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    import fastai.distributed as fd
    def _broadcast(self, t, rank): # fastai moves this tensor to CUDA for NCCL; gloo works on CPU tensors
        t = torch.tensor(t, dtype=torch.long); dist.broadcast(t, rank); return t.tolist()
    fd.DistributedDL._broadcast = _broadcast
    from fastai_ranger.ranger import ranger as opt_func
    res['fastai_opt'] = 'fastai_ranger.ranger.ranger'
    items = [(x,y) for x,y in zip(X[:64], Y[:64])]
    bs = 16//ws
    if ws == 1: # the order DistributedDL produces: rank 0 takes items 0-31, rank 1 items 32-63, batch i = both ranks' batch i
        items = [o for i in range(4) for o in items[8*i:8*i+8] + items[32+8*i:32+8*i+8]]
    dls = DataLoaders(DataLoader(items, bs=bs, shuffle=False), DataLoader(items[:16], bs=bs))
    learn = Learner(dls, model(), loss_func=nn.CrossEntropyLoss(), opt_func=opt_func)
    with learn.no_bar(), learn.no_logging():
        if ws > 1:
            with learn.distrib_ctx(sync_bn=False, cpu=True): learn.fit(2, 1e-2)
        else: learn.fit(2, 1e-2)
    res['fastai'] = {'params': learn.model.state_dict(), 'opt': learn.opt.state_dict()}
    torch.save(_plain(res), f"{out}/rank{rank}_ws{ws}.pth")
    if ws > 1: dist.barrier(); dist.destroy_process_group()
''')


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]

@pytest.fixture(scope='module')
def results(tmp_path_factory):
    "Run the worker as 2 DDP ranks plus 1 single process (all at once), return their saved results"
    d = tmp_path_factory.mktemp('ddp')
    (d/'worker.py').write_text(WORKER)
    port = _free_port()
    cmd = [sys.executable, str(d/'worker.py'), str(d)]
    procs = [subprocess.Popen(cmd, env=child_env(RANK=r, LOCAL_RANK=r, WORLD_SIZE=2, LOCAL_WORLD_SIZE=2,
                                           MASTER_ADDR='127.0.0.1', MASTER_PORT=port),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    procs.append(subprocess.Popen(cmd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = []
    try:
        for p in procs: outs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            if p.poll() is None: p.kill()
    for p,o in zip(procs, outs): assert p.returncode == 0, o[-4000:]
    load = lambda f: torch.load(d/f, weights_only=True)
    return load('rank0_ws2.pth'),load('rank1_ws2.pth'),load('rank0_ws1.pth')

def _check(r0, r1, single):
    a,b,s = dict(flat_tensors(r0)),dict(flat_tensors(r1)),dict(flat_tensors(single))
    assert a.keys() == b.keys() == s.keys()
    assert any(k.startswith('/opt/') for k in a), 'no optimizer state saved'
    for k in a: # replicas: bitwise identical parameters and optimizer state
        assert torch.equal(a[k], b[k]), f"ranks differ in {k}"
    for k in a: # DDP == single process on the global batch
        torch.testing.assert_close(a[k].double(), s[k].double(), rtol=RTOL, atol=ATOL, msg=lambda m: f"{k}: {m}")

@pytest.mark.parametrize('name', ['adamw'] + [s.name for s in OPTS.values() if s.ours])
def test_ddp_torch_optimizer(results, name):
    r0,r1,single = results
    _check(r0[name], r1[name], single[name])
    assert not torch.equal(r0[name]['params']['0.weight'], r0['init']['0.weight']), "training did not move the weights"

def test_ddp_fastai_learner(results):
    "fastai `distrib_ctx` (accelerate, gloo on CPU) trains like one process on the global batch"
    r0,r1,single = results
    assert r0['fastai_opt'] == single['fastai_opt']
    _check(r0['fastai'], r1['fastai'], single['fastai'])
    assert not torch.equal(r0['fastai']['params']['0.weight'], r0['init']['0.weight']), "training did not move the weights"

"""The benchmark tooling measures what it says: bench_optim's GPU-proxy counters (ops, host reads, uploads, a compiled
region as one op) and gpu_check's checks, which must fail when a fast path or the fp16 skip is broken.
(The whole `gpu_check.py --smoke` run is step 5 of tools/test.sh.)"""
import sys, json, pathlib, pytest, torch
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]/'benchmarks'))
import bench_optim, gpu_check
from fastai_ranger.ranger import Ranger

def test_step_counts():
    "Top-level ops, device->host reads (`bool(t)`, `.tolist()`) and uploads (`torch.tensor`) per step"
    x = torch.zeros(4)
    def step():
        x.add_(1); y = x*2
        if y.sum() > 0: pass      # a Python branch on a tensor value: a read
        x.tolist()                # a read the CPU profiler shows as no op of its own
        torch.tensor([1., 2.])    # an upload of host values
    for c in bench_optim.step_counts(step, n=2):
        assert (c['reads'], c['uploads'], c['syncs']) == (2, 1, 3), c
        assert c['names'][:5] == ['aten::add_', 'aten::mul', 'aten::sum', 'aten::gt', 'aten::is_nonzero'], c['names']
        assert c['ops'] == len(c['names'])
        assert c['launch_ops'] == 5 + 1, c     # the five above and aten::to; empty, lift_fresh, detach_, resolve_* launch nothing

def test_compiled_region_is_one_op():
    x = torch.zeros(4)
    f = torch.compile(lambda t: (t*2 + 1).sin().sum(), backend='eager')
    f(x)
    assert [c['ops'] for c in bench_optim.step_counts(lambda: f(x), n=2)] == [1, 1]

def test_count_all_rows():
    "Fused AdamW is 2 ops (step counters, fused kernel) and no sync; Ranger's fast path uploads its step number today"
    rows = bench_optim.select(bench_optim._candidates(), ['Ranger (fast)'])
    c = bench_optim.count_all({k:r.make for k,r in rows.items()}, torch.device('cpu'), warmup=6, arch='xresnet18', n=2)
    assert c['AdamW fused']['ops'] == 2 and c['AdamW fused']['syncs'] == 0, c
    assert c['Ranger (fast)']['ops'] <= 20, c
    assert bench_optim.verdict(dict(ops=5, syncs=0)) == 'PASS'
    assert bench_optim.verdict(dict(ops=21, syncs=1)) == 'MISS (ops 21 > 20, syncs 1 > 0)'

def test_select_excludes():
    rows = bench_optim.select(bench_optim._candidates(), exclude=['(reference)', 'foreach'])
    assert 'AdamW fused' in rows and 'Ranger (fast)' in rows and 'RangerLARS (GPU route)' in rows
    assert not any('reference' in k or 'foreach' in k for k in rows)

def _exact(tmp_path, *only):
    rc = gpu_check.main(['--smoke', '--out', str(tmp_path), '--sections', 'exact', '--dtypes', 'fp64', '--exact-only', *only])
    return rc, json.loads((tmp_path/'gpu_check.json').read_text())

def test_exact_passes_and_lars_gradients_not_shared(tmp_path):
    "LARS changes gradients in place: each trajectory gets its own copies (shared ones made fast != reference)"
    rc,j = _exact(tmp_path, 'Ranger gc=None', 'LARS(SGD')
    assert rc == 0 and j['counts']['PASS'] == 3 and j['counts']['FAIL'] == 0, j['checks']

def test_exact_catches_a_broken_fast_path(tmp_path, monkeypatch):
    real = Ranger._update_fast
    def broken(self, g, ps, *args):
        res = real(self, g, ps, *args)
        torch._foreach_mul_(ps, 1 + 1e-9)   # a relative error far below fp32 rounding, far above the float64 tolerance
        return res
    monkeypatch.setattr(Ranger, '_update_fast', broken)
    rc,j = _exact(tmp_path, 'Ranger gc=None eps_mode=fastai')
    assert rc == 1 and [c['status'] for c in j['checks'] if c['section'] == 'exact'] == ['SKIP', 'FAIL'], j['checks']
    assert (tmp_path/'gpu_check.md').exists()

def test_inf_skip_check_can_fail():
    "Without a gradient scaler (fp32) the injected inf reaches the optimizer: the check must say FAIL"
    from fastai_ranger.ranger import ranger
    rep = gpu_check.Report(60)
    gpu_check.check_inf_skip(rep, 'cpu', 'ranger', ranger, slow=True, prec='fp32')
    assert rep.checks[-1]['status'] == 'FAIL', rep.checks
    gpu_check.check_inf_skip(rep, 'cpu', 'ranger', ranger, slow=True, prec='fp16')
    assert rep.checks[-1]['status'] == 'PASS', rep.checks

@pytest.mark.parametrize('argv,msg', [([], '--out DIR is required'), (['--smoke', '--sections', 'gpu'], "unknown section(s) ['gpu']"),
                                      (['--smoke', '--dtypes', 'fp8'], "unknown dtype(s) ['fp8']"), (['--smoke', '--size', '16'], '--size must be >= 32'),
                                      (['--smoke', '--data', '/no/such/folder'], 'no such folder'),
                                      (['--smoke', '--bench-arch', 'resnet9'], 'not a fastai xresnet')])
def test_bad_arguments(argv, msg, capsys):
    with pytest.raises(SystemExit): gpu_check.parse(argv)
    assert msg in capsys.readouterr().err

def test_bandwidth_floor():
    "The floor is the bytes a step must move (fp32 words per element) over a measured, positive bandwidth"
    assert bench_optim.floor_s(7, 1_000_000, 28e9) == pytest.approx(1e-3)
    bw = bench_optim.stream_bandwidth(torch.device('cpu'), mbytes=8, reps=2)
    assert 1e8 < bw < 1e13, bw

"""Time one optimizer step on xresnet50's parameters and print each as a ratio to fused AdamW measured in the same run,
with GPU-proxy columns: ops dispatched and host syncs per step, and each step's ratio to the memory-bandwidth floor.

Usage: python benchmarks/bench_optim.py [--steps 24] [--warmup 8] [--device cpu|cuda] [--only NAME ...]
                                        [--arch xresnet50] [--no-counts] [--first-step] [--json FILE]

Columns (per step, after `--warmup` steps, so RAdam is rectified):
- `ops`: top-level ops dispatched (the launches a GPU would see: every aten op called from Python, a compiled region
  counted as one), the typical step and the mean over one Lookahead cycle of k=6 steps; `launch ops` leaves out the
  ones that launch nothing on a GPU (allocation and metadata: empty, set_, select, view, detach_, ...);
- `syncs`: host syncs: device->host reads (`.item()`, `bool(t)`, `.tolist()`, `nonzero`) plus uploads of host values
  (`torch.tensor(...)` on the device: on CUDA a blocking copy from pageable memory waits for the stream);
- `x floor`: the median step over the time the bytes the step must move take at the measured memory bandwidth
  (an in-place `a += b` over 256 MB buffers; 1 GB on a GPU).
Targets for this package's optimizers on the route a GPU takes: <= 20 ops and 0 syncs per step (PASS/MISS below).
`--first-step` times the first `step()` (compiles included) in a fresh process with an empty inductor cache (cold)
and again in a second process reusing that cache (warm).
"""
from __future__ import annotations
import argparse, json, os, statistics, subprocess, sys, tempfile, time
from contextlib import contextmanager
import torch

OPS_TARGET,SYNCS_TARGET,LOOKAHEAD_K = 20,0,6
_COMPILED = ('Torch-Compiled Region', 'CompiledFunction')   # profiler names of a compiled call: one op, not descended
_READS = {'aten::item', 'aten::_local_scalar_dense', 'aten::is_nonzero', 'aten::nonzero', 'aten::masked_select'}
_UPLOAD = 'aten::lift_fresh'   # what `torch.tensor(host values)` dispatches
_META = {'aten::empty', 'aten::empty_like', 'aten::empty_strided', 'aten::set_', 'aten::select', 'aten::view', 'aten::alias',
         'aten::as_strided', 'aten::narrow', 'aten::slice', 'aten::unbind', 'aten::split', 'aten::reshape', 'aten::t',
         'aten::detach', 'aten::detach_', 'aten::lift_fresh', 'aten::unsqueeze', 'aten::squeeze', 'aten::expand',
         'aten::permute', 'aten::transpose', 'aten::resolve_conj', 'aten::resolve_neg'}   # no kernel on a GPU: metadata, allocation

def _sync(dev):
    if dev.type == 'cuda': torch.cuda.synchronize()

def _params(dev, seed=0, arch='xresnet50'):
    "Parameters of fastai's `arch` (n_out 10) on `dev`, with fixed random gradients"
    from fastai.vision.models import xresnet
    torch.manual_seed(seed)
    ps = [p.detach().to(dev).requires_grad_() for p in getattr(xresnet, arch)(n_out=10).parameters()]
    g = torch.Generator(device=dev).manual_seed(seed)
    for p in ps: p.grad = torch.randn(p.shape, generator=g, device=dev)*1e-2
    return ps

class Row:
    "A benchmark row: `make(params)` builds the optimizer; `words` fp32 words per element the step must move; `ours` a target row"
    def __init__(self, make, words:float, ours:bool=False): self.make,self.words,self.ours = make,words,ours

def _on_route(make, route:str):
    "`make`'s optimizer with its fast-path engine switched to `route` ('gpu' forces the GPU route on CPU too)"
    def f(ps):
        o = make(ps); o.engine.route = route
        return o
    return f

# hyperparameters of each of our optimizers in the benchmark (the rest are its defaults)
_KW = dict(ranger=dict(lr=1e-3), ranger_lars=dict(lr=1e-3), adan=dict(lr=1e-3, weight_decay=0.02))

def _candidates(dev=torch.device('cpu')) -> dict:
    """name -> `Row`: the peers (fused and foreach AdamW, fastai's `ranger`), then each of this package's optimizers from
    `fastai_ranger.registry.OPTS` on its fast path (the route a GPU takes forced as a row of its own on CPU) and its
    reference path. The words a step moves per element come from the registry (`OptSpec.step_words`): AdamW reads p, g,
    m, v and writes p, m, v (7); a Lookahead sync every k steps reads p, slow and writes both (4/k); RangerLARS needs a
    second pass for its trust ratio (10 + 4/k); Adan reads p, g and four moments and writes p and four moments (11)"""
    from fastai.optimizer import ranger as fastai_ranger
    from fastai_ranger.registry import OPTS
    c = {'AdamW fused': Row(lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=1e-2, fused=True), 7),
         'AdamW foreach': Row(lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=1e-2, foreach=True), 7),
         'fastai ranger': Row(lambda ps: fastai_ranger(ps, lr=1e-3), OPTS['fastai_ranger'].step_words)}
    for s in (s for s in OPTS.values() if s.ours):
        C,kw,w = s.cls(),_KW.get(s.name, {}),s.step_words
        fast = lambda ps,C=C,kw=kw: C(ps, **kw)
        c[f'{C.__name__} (fast)'] = Row(fast, w, ours=dev.type != 'cpu')
        if dev.type == 'cpu': c[f'{C.__name__} (GPU route)'] = Row(_on_route(fast, 'gpu'), w, ours=True)
        c[f'{C.__name__} (reference)'] = Row(lambda ps,C=C,kw=kw: C(ps, foreach=False, **kw), w)
    return c

def select(cands:dict, only=None, exclude=()) -> dict:
    "The rows whose names contain one of the substrings `only` and none of `exclude` (AdamW fused always kept: it is the yardstick)"
    keep = lambda k: (not only or any(s in k for s in only)) and not any(s in k for s in exclude or ())
    return {k:v for k,v in cands.items() if k == 'AdamW fused' or keep(k)}

def time_all(makers:dict, dev, steps, warmup, arch='xresnet50') -> dict:
    "Seconds of every timed `step()` of each optimizer, timed round-robin (one step of each per round) so load drifts hit all alike"
    opts = {k: make(_params(dev, arch=arch)) for k,make in makers.items()}
    for _ in range(warmup):
        for o in opts.values(): o.step()
    _sync(dev); ts = {k: [] for k in opts}
    for _ in range(steps):
        for k,o in opts.items():
            t0 = time.perf_counter(); o.step(); _sync(dev); ts[k].append(time.perf_counter() - t0)
    return ts

# ---- GPU-proxy counts ----------------------------------------------------------------------------------------------
def top_ops(ev) -> list:
    "Names of the top-level ops under profiler event `ev`: an op (a `::` name) with no op above it; a compiled region is one op"
    if ev.name.startswith(_COMPILED) or '::' in ev.name: return [ev.name]
    return [n for c in ev.cpu_children for n in top_ops(c)]

@contextmanager
def count_tolist():
    "Count `Tensor.tolist()` calls (a device->host read on CUDA that the CPU profiler does not show as an op)"
    n,had,orig = [0],'tolist' in torch.Tensor.__dict__,torch.Tensor.tolist
    def tolist(self, *args, **kwargs):
        n[0] += 1
        return orig(self, *args, **kwargs)
    torch.Tensor.tolist = tolist
    try: yield n
    finally:
        if had: torch.Tensor.tolist = orig
        else: del torch.Tensor.tolist

def step_counts(step, n:int=LOOKAHEAD_K) -> list:
    "Per call of `step()` (n calls, profiled on the CPU side): dict(ops, reads, uploads, syncs) of the top-level ops"
    from torch.profiler import profile, ProfilerActivity, record_function
    tl = []
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(n):
            with count_tolist() as nt, record_function(f'bench_step_{i}'): step()
            tl.append(nt[0])
    roots = {e.name: e for e in prof.events() if e.cpu_parent is None and e.name.startswith('bench_step_')}
    res = []
    for i in range(n):
        ops = top_ops(roots[f'bench_step_{i}'])
        reads = sum(o in _READS for o in ops) + tl[i]
        ups = sum(o == _UPLOAD for o in ops)
        res.append(dict(ops=len(ops), launch_ops=sum(o not in _META for o in ops), reads=reads, uploads=ups, syncs=reads+ups, names=ops))
    return res

def summarize_counts(cs:list) -> dict:
    "Typical (median) and mean ops per step, and mean syncs (reads, uploads) per step"
    mean = lambda k: statistics.fmean(c[k] for c in cs)
    return dict(ops=statistics.median(c['ops'] for c in cs), ops_mean=mean('ops'), launch_ops=statistics.median(c['launch_ops'] for c in cs), syncs=mean('syncs'),
                reads=mean('reads'), uploads=mean('uploads'))

def count_all(makers:dict, dev, warmup, arch='xresnet50', n:int=LOOKAHEAD_K) -> dict:
    "`summarize_counts` of each optimizer over `n` steps after `warmup` untimed ones"
    res = {}
    for k,make in makers.items():
        o = make(_params(dev, arch=arch))
        for _ in range(warmup): o.step()
        res[k] = summarize_counts(step_counts(o.step, n))
    return res

def verdict(c:dict) -> str:
    "PASS if a row meets both GPU-route targets, else MISS (naming what misses)"
    miss = ([f"ops {c['ops']:g} > {OPS_TARGET}"] if c['ops'] > OPS_TARGET else []) + \
           ([f"syncs {c['syncs']:g} > {SYNCS_TARGET}"] if c['syncs'] > SYNCS_TARGET else [])
    return 'PASS' if not miss else 'MISS (' + ', '.join(miss) + ')'

# ---- bandwidth floor -----------------------------------------------------------------------------------------------
def stream_bandwidth(dev, mbytes:int=256, reps:int=5) -> float:
    """Bytes/s (read + written) of an in-place `a += b` over two `mbytes` fp32 buffers, median of `reps`: memory moved the
    way an optimizer step moves it (in place, so no CPU cache line is fetched only to be overwritten, as a copy's would be)"""
    n = mbytes*2**20//4
    a,b = torch.zeros(n, device=dev),torch.randn(n, device=dev)
    a.add_(b); _sync(dev); ts = []
    for _ in range(reps):
        t0 = time.perf_counter(); a.add_(b); _sync(dev); ts.append(time.perf_counter()-t0)
    return 3*n*4/statistics.median(ts)

def floor_s(words:float, numel:int, bw:float) -> float:
    "Seconds to move `words` fp32 words per element of `numel` elements at `bw` bytes/s"
    return words*4*numel/bw

# ---- first step, cold and warm -------------------------------------------------------------------------------------
def _first_step_child(name, dev, arch):
    "In a fresh process: seconds of the first and the second `step()` of optimizer `name`"
    make = _candidates(dev)[name].make
    o = make(_params(dev, arch=arch))
    ts = []
    for _ in range(2):
        _sync(dev); t0 = time.perf_counter(); o.step(); _sync(dev); ts.append(time.perf_counter()-t0)
    print(json.dumps(dict(first=ts[0], second=ts[1])))

def first_step(names, dev, arch='xresnet50', timeout:float=600) -> dict:
    "name -> dict(cold, warm, second): first-step seconds with an empty inductor cache, then reusing it"
    res = {}
    for name in names:
        with tempfile.TemporaryDirectory() as d:
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=d, TRITON_CACHE_DIR=os.path.join(d, 'triton'))
            r = {}
            for kind in ('cold', 'warm'):
                cmd = [sys.executable, os.path.abspath(__file__), '--_first-step', name, '--device', str(dev), '--arch', arch]
                p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
                if p.returncode: raise RuntimeError(f"first-step child for {name!r} failed: {p.stderr.strip()[-500:]}")
                out = json.loads(p.stdout.strip().splitlines()[-1])
                r[kind] = out['first']; r['second'] = out['second']
            res[name] = r
    return res

# ---- the whole benchmark -------------------------------------------------------------------------------------------
def run(device=None, steps:int=24, warmup:int=8, only=None, arch='xresnet50', counts:bool=True, first:bool=False,
        bw_mbytes:int=256, quiet:bool=False, exclude=()) -> dict:
    "Time, count and compare every row on `device`; returns the results (and prints the table unless `quiet`)"
    dev = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    rows = select(_candidates(dev), only, exclude)
    numel = sum(p.numel() for p in _params(dev, arch=arch))
    head = (f"device={dev} threads={torch.get_num_threads()} torch={torch.__version__} arch={arch} "
            f"params={numel/1e6:.2f}M steps={steps} warmup={warmup}")
    # the GPU-route rows forced on the CPU are timed in a round of their own, against AdamW fused timed in that round:
    # timed together with the CPU-route rows, their flat copies of p and g slowed the other rows' steps (RangerLARS's
    # CPU route 1.8x -> 2.6-5x AdamW here), which no real run (one optimizer per process) sees
    forced = [k for k in rows if k.endswith('(GPU route)')]
    ts,base = {},{}
    for grp in ([k for k in rows if k not in forced], ['AdamW fused'] + forced):
        if len(grp) < 2 and ts: continue
        t = time_all({k:rows[k].make for k in grp}, dev, steps, warmup, arch)
        for k in grp:
            if k not in ts: ts[k],base[k] = t[k],t['AdamW fused']
    bw = stream_bandwidth(dev, bw_mbytes if dev.type == 'cpu' else 4*bw_mbytes)
    cnt = count_all({k:r.make for k,r in rows.items()}, dev, warmup, arch) if counts else {}
    fs = first_step(list(rows), dev, arch) if first else {}
    res = dict(header=head, device=str(dev), arch=arch, numel=numel, steps=steps, warmup=warmup, bw_GBps=bw/1e9,
               targets=dict(ops=OPS_TARGET, syncs=SYNCS_TARGET), rows={})
    for k,r in rows.items():
        med,mean = statistics.median(ts[k]),statistics.fmean(ts[k])
        med0,mean0 = statistics.median(base[k]),statistics.fmean(base[k])
        fl = floor_s(r.words, numel, bw)
        d = dict(median_ms=med*1e3, x_adamw=med/med0, mean_ms=mean*1e3, x_adamw_mean=mean/mean0, words=r.words,
                 floor_ms=fl*1e3, x_floor=med/fl, ours=r.ours)
        if k in cnt: d.update(cnt[k])
        if k in fs: d.update(first_cold_s=fs[k]['cold'], first_warm_s=fs[k]['warm'], second_s=fs[k]['second'])
        if r.ours and k in cnt: d['target'] = verdict(cnt[k])
        res['rows'][k] = d
    if not quiet: print(format_table(res))
    return res

def format_table(res:dict, md:bool=False) -> str:
    "The results of `run` as a fixed-width table (or Markdown with `md`)"
    rows = res['rows']
    cols = [('median ms','median_ms','.2f'), ('x AdamW','x_adamw','.2f'), ('mean ms','mean_ms','.2f'),
            ('x AdamW','x_adamw_mean','.2f'), ('x floor','x_floor','.2f')]
    if any('ops' in r for r in rows.values()):
        cols += [('ops','ops','g'), ('ops mean','ops_mean','.1f'), ('launch ops','launch_ops','g'), ('syncs','syncs','.2f'), ('reads','reads','.2f'), ('uploads','uploads','.2f')]
    if any('first_cold_s' in r for r in rows.values()):
        cols += [('1st cold s','first_cold_s','.2f'), ('1st warm s','first_warm_s','.2f'), ('2nd s','second_s','.3f')]
    fmt = lambda r,c: '' if c[1] not in r else format(r[c[1]], c[2])
    if md:
        out = ['| optimizer | ' + ' | '.join(c[0] for c in cols) + ' | GPU-route target |', '|---' * (len(cols)+2) + '|']
        out += [f"| {k} | " + ' | '.join(fmt(r,c) for c in cols) + f" | {r.get('target','')} |" for k,r in rows.items()]
    else:
        w = max(map(len, rows)) + 2
        out = [res['header'], f"memory bandwidth {res['bw_GBps']:.1f} GB/s (read + written by an in-place a += b)",
               "median: a typical step; mean: amortised over the timed steps, Lookahead syncs (every k=6 steps) included",
               f"{'optimizer':<{w}}" + ''.join(f"{c[0]:>11}" for c in cols)]
        out += [f"{k:<{w}}" + ''.join(f"{fmt(r,c):>11}" for c in cols) for k,r in rows.items()]
        tg = {k:r['target'] for k,r in rows.items() if 'target' in r}
        if tg:
            out.append(f"GPU-route targets (<= {OPS_TARGET} ops/step, {SYNCS_TARGET} host syncs/step):")
            out += [f"  {k:<{w}}{v}" for k,v in tg.items()]
    return '\n'.join(out)

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--steps', type=int, default=24, help='timed steps per optimizer (use a multiple of 6 for whole Lookahead cycles)')
    ap.add_argument('--warmup', type=int, default=8, help='untimed steps first (>= 6 so RAdam is rectified)')
    ap.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    ap.add_argument('--only', nargs='*', help='substrings of the rows to run (AdamW fused always runs)')
    ap.add_argument('--exclude', nargs='*', help='substrings of rows to leave out (e.g. reference)')
    ap.add_argument('--arch', default='xresnet50', help="fastai xresnet whose parameters are stepped (e.g. xresnet18)")
    ap.add_argument('--no-counts', action='store_true', help='skip the profiled op and sync counts')
    ap.add_argument('--first-step', action='store_true', help='also time the first step cold and warm (subprocesses; slow)')
    ap.add_argument('--json', help='also write the results to this file')
    ap.add_argument('--_first-step', dest='child', help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child: return _first_step_child(a.child, torch.device(a.device), a.arch)
    for n,v,lo in (('steps', a.steps, 1), ('warmup', a.warmup, 0)):
        if v < lo: ap.error(f"--{n} must be >= {lo}, got {v}")
    from fastai.vision.models import xresnet
    if not callable(getattr(xresnet, a.arch, None)): ap.error(f"--arch {a.arch}: not a fastai xresnet (e.g. xresnet18, xresnet50)")
    res = run(a.device, a.steps, a.warmup, a.only, a.arch, counts=not a.no_counts, first=a.first_step, exclude=a.exclude)
    if a.json:
        with open(a.json, 'w') as f: json.dump(res, f, indent=1)

if __name__ == '__main__': main()

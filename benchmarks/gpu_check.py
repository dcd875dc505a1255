#!/usr/bin/env python
"""The GPU proof in one command: exactness of every fast path on the device, the optimizer-step benchmark with kernel
and sync counts and the bandwidth floor, training throughput of the canonical model, and a real run.

    python benchmarks/gpu_check.py --out DIR [--data FOLDER]     # on one GPU: under 8 minutes
    python benchmarks/gpu_check.py --smoke [--out DIR] [--data FOLDER]   # the same code on CPU, tiny sizes (CI)

Writes DIR/gpu_check.json and DIR/gpu_check.md. Exits 1 if a check fails (FAIL) or a section errors (ERROR); the speed
targets (<= 20 kernel launches and 0 host syncs per optimizer step) are reported as PASS/MISS without failing.
Checks that need CUDA are reported as SKIP with the reason on a machine without one, never as passed.
"""
from __future__ import annotations
import argparse, itertools, json, math, os, platform, statistics, sys, tempfile, time, traceback, warnings
from contextlib import contextmanager
from pathlib import Path
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_optim

LEADERBOARD_128_5 = 87.43   # Imagenette 128 px, 5 epochs: the leaderboard cell `imagenette-128-5` reproduces
SECTIONS = ('exact', 'amp', 'optim', 'train', 'real')

# ---- report --------------------------------------------------------------------------------------------------------
class Report:
    "Checks (PASS, MISS: a speed target not met, FAIL, SKIP, ERROR; each with a detail) and tables per section, timed against a budget"
    def __init__(self, budget_s:float):
        self.t0,self.budget,self.checks,self.tables,self.times,self.notes = time.perf_counter(),budget_s,[],{},{},{}
    def elapsed(self) -> float: return time.perf_counter() - self.t0
    def left(self) -> float: return self.budget - self.elapsed()

    def add(self, section:str, name:str, status:str, detail:str='', **vals):
        "Record one check and print it"
        self.checks.append(dict(section=section, name=name, status=status, detail=detail, **vals))
        print(f"[{section}] {status:<5} {name}" + (f": {detail}" if detail else ''), flush=True)

    def table(self, section:str, rows:list): self.tables.setdefault(section, []).extend(rows)
    @property
    def failed(self) -> list: return [c for c in self.checks if c['status'] in ('FAIL', 'ERROR')]

    def to_json(self, meta:dict) -> dict:
        counts = {s: sum(c['status'] == s for c in self.checks) for s in ('PASS','MISS','FAIL','SKIP','ERROR')}
        return dict(meta=meta, counts=counts, wall_s=self.elapsed(), section_s=self.times, checks=self.checks,
                    tables=self.tables, notes=self.notes)

    def to_md(self, meta:dict) -> str:
        j = self.to_json(meta)
        out = [f"# gpu_check: {meta['mode']} on {meta['device_name']}", '',
               f"{meta['when']} · torch {meta['torch']} · fastai {meta['fastai']} · fastai_ranger {meta['fastai_ranger']} · "
               f"{meta['platform']} · {meta['cpus']} CPUs · total {j['wall_s']:.0f} s", '',
               'Checks: ' + ', '.join(f"{v} {k}" for k,v in j['counts'].items()), '',
               '`python benchmarks/gpu_check.py ' + ' '.join(meta['argv']) + '`', '']
        for s in SECTIONS:
            cs,ts = [c for c in self.checks if c['section'] == s],self.tables.get(s, [])
            if not cs and not ts: continue
            out += [f"## {s} ({self.times.get(s, 0):.0f} s)", '']
            if s in self.notes: out += [self.notes[s], '']
            if cs:
                out += ['| check | status | detail |', '|---|---|---|']
                out += [f"| {c['name']} | {c['status']} | {c['detail']} |" for c in cs] + ['']
            if ts:
                keys = list(dict.fromkeys(k for r in ts for k in r))
                out += ['| ' + ' | '.join(keys) + ' |', '|---' * len(keys) + '|']
                out += ['| ' + ' | '.join(_fmt(r.get(k, '')) for k in keys) + ' |' for r in ts] + ['']
        return '\n'.join(out) + '\n'

def _fmt(v):
    if isinstance(v, float): return f"{v:.4g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)

def _sync(dev):
    if torch.device(dev).type == 'cuda': torch.cuda.synchronize()

@contextmanager
def _fallback_warnings():
    "Collect the warnings that say a compiled kernel fell back to the eager path (a fast path not really tested)"
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter('always')
        got = []
        yield got
    got += [str(w.message) for w in ws if 'kernel unavailable' in str(w.message)]

# ---- 1. exactness: fast path == reference path on the device --------------------------------------------------------
SHAPES = [(8,3,3,3), (8,), (8,), (8,), (300,288), (300,), (4,300), (4,)]   # conv, BN, a large (>65536) and a small linear
BF16_ULP = 2**-8   # bfloat16 keeps 8 significant bits
# max |fast - reference| / max |reference| per tensor after `--exact-steps` steps; two correct paths round differently each
# step, so bfloat16 (where that is a few ulps) also has to be as close to the float64 trajectory as the reference path is
TOLS = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 16*BF16_ULP}
_DT = {'fp64': torch.float64, 'fp32': torch.float32, 'bf16': torch.bfloat16}

def _problem(n:int, seed:int=0):
    "Initial parameters and `n` steps of gradients, float64 on the CPU (cast to each device and dtype)"
    gen = torch.Generator().manual_seed(seed)
    p0 = [torch.randn(s, generator=gen, dtype=torch.float64)*0.5 for s in SHAPES]
    gs = [[torch.randn(s, generator=gen, dtype=torch.float64)*0.1 for s in SHAPES] for _ in range(n)]
    return p0, gs

def _rounded(prob, dt):
    "`prob` with its parameters and gradients rounded to `dt` (still float64): the inputs a `dt` run really sees"
    r = lambda t: t.to(dt).double()
    return [r(p) for p in prob[0]], [[r(g) for g in step] for step in prob[1]]

def trajectory(make, dev, dt, prob, flags:bool=True) -> list:
    "Parameters after stepping `make(params)` through the gradients of `prob`; `flags`: no weight decay on 1-d tensors (fastai's `do_wd`)"
    p0,gs = prob
    ps = [p.to(dev, dt, copy=True).requires_grad_() for p in p0]
    opt = make(ps)
    if flags:
        for p in ps:
            if p.dim() == 1: opt.state[p]['do_wd'] = False
    for step in gs:
        for p,g in zip(ps, step): p.grad = g.to(dev, dt, copy=True)   # optimizers may change gradients in place (LARS does)
        opt.step()
    return [p.detach() for p in ps]

def max_rel(a:list, b:list) -> float:
    "Largest difference of any tensor, relative to that tensor's largest magnitude (in float64)"
    return max(((x.double().cpu() - y.double().cpu()).abs().max()/y.double().cpu().abs().max().clamp(min=1e-30)).item()
               for x,y in zip(a, b))

class LarsReference:
    "Per-tensor apex LARC (trust ratio η·‖p‖/(‖g‖ + wd·‖p‖ + eps), clipped at lr, 1-d tensors excluded) around SGD with momentum"
    def __init__(self, ps, lr, momentum, weight_decay, trust_coef=1e-3, eps=1e-8):
        self.ps,self.lr,self.mom,self.wd,self.tc,self.eps,self.bufs,self.state = ps,lr,momentum,weight_decay,trust_coef,eps,{},{}
    @torch.no_grad()
    def step(self):
        for p in self.ps:
            g = p.grad.clone()
            if p.dim() <= 1: g += self.wd*p
            else:
                wn,gn = p.norm(),g.norm()
                if wn != 0 and gn != 0:
                    r = (self.tc*wn/(gn + self.wd*wn + self.eps)/self.lr).clamp(max=1.)
                    g = (g + self.wd*p)*r
            b = self.bufs[p] = g if p not in self.bufs else self.bufs[p].mul_(self.mom).add_(g)
            p.add_(b, alpha=-self.lr)

def exact_cases(dev) -> list:
    "(name, fast maker, reference maker, flags) for every fast path; RangerLARS's two routes where both exist (CPU)"
    from fastai_ranger.ranger import Ranger
    from fastai_ranger.ranger_lars import RangerLARS, LARS
    from fastai_ranger.adan import Adan
    from fastai_ranger.lookahead import Lookahead
    cases = []
    for gc,em in itertools.product((None, 'all'), ('fastai', 'lessw2020')):
        kw = dict(lr=1e-2, weight_decay=0.1, gc=gc, eps_mode=em)
        cases.append((f"Ranger gc={gc} eps_mode={em}", lambda ps,kw=kw: Ranger(ps, **kw),
                      lambda ps,kw=kw: Ranger(ps, foreach=False, **kw), True))
    routes = ('cpu', 'gpu') if torch.device(dev).type == 'cpu' else ('gpu',)
    def lars(ps, route, **kw):
        o = RangerLARS(ps, **kw)
        o.engine.route = route
        return o
    for trust,em,route in itertools.product(('over9000', 'lamb', None), ('fastai', 'lessw2020'), routes):
        if trust is None and route == 'cpu': continue   # trust=None is Ranger's step: no route to choose
        kw = dict(lr=1e-2, weight_decay=0.1, trust=trust, eps_mode=em)
        cases.append((f"RangerLARS trust={trust} eps_mode={em} route={route}", lambda ps,kw=kw,r=route: lars(ps, r, **kw),
                      lambda ps,kw=kw: RangerLARS(ps, foreach=False, **kw), True))
    def adan(ps, min_numel=None, **kw):
        o = Adan(ps, **kw)
        if min_numel is not None: o.engine.min_numel = min_numel   # every tensor gets a compiled call of its own
        return o
    for nm,kw in (('', {}), (' no_prox', dict(no_prox=True)), (' max_grad_norm=0.05', dict(max_grad_norm=0.05))):
        kw = dict(lr=3e-3, weight_decay=0.02, **kw)
        for fn,fk in (('foreach', dict(fused=False)), ('compiled flat', dict(fused=True)), ('compiled per tensor', dict(min_numel=48))):
            cases.append((f"Adan{nm} {fn}", lambda ps,kw=kw,fk=fk: adan(ps, **fk, **kw), lambda ps,kw=kw: Adan(ps, foreach=False, **kw), True))
    for inner in ('foreach', 'fused'):
        cases.append((f"Lookahead(AdamW {inner})",
                      lambda ps,i=inner: Lookahead(torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, **{i: True}), k=6, alpha=0.5),
                      lambda ps: Lookahead(torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, foreach=False), k=6, alpha=0.5, foreach=False),
                      False))
    cases.append(("LARS(SGD momentum)", lambda ps: LARS(torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-2, foreach=True)),
                  lambda ps: LarsReference(ps, lr=0.1, momentum=0.9, weight_decay=1e-2), False))
    return cases

def check_exact(rep:Report, dev, dtypes, steps:int, only=None):
    "Every fast path (or those whose names contain one of `only`) against its reference path on `dev` for each dtype (and, off the CPU, against the CPU float64 reference)"
    prob = _problem(steps)
    for dn in dtypes:
        dt = _DT[dn]
        if dt == torch.bfloat16 and torch.device(dev).type == 'cuda' and not torch.cuda.is_bf16_supported():
            rep.add('exact', f"{dn} (all optimizers)", 'SKIP', 'this GPU has no bfloat16'); continue
        for name,fast,ref,flags in exact_cases(dev):
            if only and not any(o in name for o in only): continue
            try:
                with _fallback_warnings() as fb: a = trajectory(fast, dev, dt, prob, flags)
                b = trajectory(ref, dev, dt, prob, flags)
                err,tol = max_rel(a, b),TOLS[dt]
                ok = err <= tol and all(torch.isfinite(x).all() for x in a)
                detail = f"max rel diff {err:.2e} (tol {tol:.0e})"
                if dt == torch.bfloat16:   # both round differently at 8 bits: the fast path must be as close to float64 as the reference
                    r64 = trajectory(ref, dev, torch.float64, _rounded(prob, dt), flags)
                    ef,er = max_rel(a, r64),max_rel(b, r64)
                    ok,detail = ok and ef <= 2*er + BF16_ULP, detail + f"; vs float64 from the same rounded inputs: fast {ef:.2e}, reference {er:.2e} (fast <= 2x reference + {BF16_ULP:.1e})"
                if fb: ok,detail = False,detail + f"; fast path fell back to eager: {fb[0][:120]}"
                if ok and dt == torch.float64 and torch.device(dev).type != 'cpu':
                    e2 = max_rel(a, trajectory(ref, 'cpu', dt, prob, flags))
                    ok,detail = e2 <= 1e-10,detail + f"; vs CPU reference {e2:.2e} (tol 1e-10)"
                rep.add('exact', f"{name} {dn}", 'PASS' if ok else 'FAIL', detail, err=err, tol=tol)
            except Exception as e: rep.add('exact', f"{name} {dn}", 'FAIL', f"{type(e).__name__}: {str(e)[:200]}")

# ---- 2. mixed precision through fastai -------------------------------------------------------------------------------
def _cpu_amp_cb(mode:str):
    "fastai's `MixedPrecision` flow (autocast, GradScaler, fake-optimizer step skip) on the CPU: fastai hard-codes 'cuda'"
    from fastai.callback.fp16 import MixedPrecision
    class CPUMixedPrecision(MixedPrecision):
        def before_fit(self):
            dtype = torch.float16 if self.amp_mode.value == 'fp16' else torch.bfloat16
            self.kwargs['enabled'] = dtype == torch.float16
            self.autocast = torch.amp.autocast('cpu', dtype=dtype)
            self.learn.scaler,self.scales = torch.amp.GradScaler('cpu', **self.kwargs),[]
    return CPUMixedPrecision(mode)

def apply_precision(learn, prec:str, dev) -> str:
    "Mixed precision `prec` ('fp16', 'bf16' or 'fp32') on `learn`: fastai's `to_fp16`/`to_bf16` on CUDA, a CPU stand-in elsewhere"
    if prec == 'fp32': return 'fp32'
    if torch.device(dev).type == 'cuda':
        learn.to_fp16() if prec == 'fp16' else learn.to_bf16()
        return f"{prec} (fastai to_{prec})"
    learn.add_cb(_cpu_amp_cb(prec))
    return f"{prec} (CPU autocast stand-in)"

class SynthDL:
    "`n` batches of one device-resident (x, y), enough of a DataLoader for fastai's `Learner`"
    def __init__(self, x, y, n:int): self.x,self.y,self.n_b,self.bs,self.device = x,y,n,len(x),x.device
    def __iter__(self): return ((self.x, self.y) for _ in range(self.n_b))
    def __len__(self): return self.n_b
    @property
    def n(self): return self.n_b*self.bs
    def one_batch(self): return self.x, self.y

def synth_learner(model, x, y, n:int, opt_func, dev, cbs=None):
    "A `Learner` on `n` training batches of (x, y) (and one validation batch), all on `dev`"
    from fastai.learner import Learner
    from fastai.data.core import DataLoaders
    from fastai.losses import CrossEntropyLossFlat
    import fastai.callback.schedule, fastai.callback.fp16, fastai.callback.channelslast   # patch fit_flat_cos, to_fp16, to_channelslast
    dls = DataLoaders(SynthDL(x, y, n), SynthDL(x, y, 1))
    return Learner(dls, model.to(dev), loss_func=CrossEntropyLossFlat(), opt_func=opt_func, cbs=cbs, wd=1e-2)

def _tiny(dev, seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    x,y = torch.randn(16, 3, 16, 16), torch.randint(0, 4, (16,))
    return m, x.to(dev), y.to(dev)

def _torch_opt(learn):
    o = learn.opt
    return getattr(o, 'opt', o)

def _snapshot(learn) -> dict:
    "Clones of the parameters and of every tensor and step count in the optimizer state"
    o,ps = _torch_opt(learn),list(learn.model.parameters())
    snap = {('p', i): p.detach().clone() for i,p in enumerate(ps)}
    st = getattr(o, 'state', {})
    for i,p in enumerate(ps):
        for k,v in (st.get(p, {}) if hasattr(st, 'get') else {}).items():
            snap[(k, i)] = v.detach().clone() if isinstance(v, torch.Tensor) else v
    return snap

def _same(a:dict, b:dict) -> list:
    "Keys whose values differ between snapshots (NaN == NaN)"
    bad = [k for k in a if k not in b] + [k for k in b if k not in a]
    for k in a.keys() & b.keys():
        x,y = a[k],b[k]
        if isinstance(x, torch.Tensor): eq = x.shape == y.shape and torch.equal(torch.nan_to_num(x), torch.nan_to_num(y))
        else: eq = x == y
        if not eq: bad.append(k)
    return bad

def check_inf_skip(rep:Report, dev, name, opt_func, slow:bool, prec='fp16', at:int=7, n:int=10):
    "Train with `prec`, an inf gradient injected at iteration `at`: that step is skipped, parameters and optimizer state untouched"
    from fastai.callback.core import Callback
    class Inject(Callback):
        order = 0
        def after_backward(self):
            if self.iter != at: return
            p = next(p for p in self.learn.model.parameters() if p.grad is not None)
            p.grad.view(-1)[0] = float('inf')
            self.before = _snapshot(self.learn)
        def after_batch(self):
            if self.iter == at: self.after = _snapshot(self.learn)
            if self.iter == at+1: self.next = _snapshot(self.learn)
    m,x,y = _tiny(dev)
    inj = Inject()
    learn = synth_learner(m, x, y, n, opt_func, dev, cbs=[inj])
    how = apply_precision(learn, prec, dev)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-2)
    bad,moved = _same(inj.before, inj.after),_same(inj.after, inj.next)
    keys = sorted({k for k,_ in inj.before if k != 'p'})
    ok = not bad and any(k[0] == 'p' for k in moved) and ('slow' in keys or not slow)
    detail = (f"{how}; state keys {keys}; " + ("step skipped, parameters and state untouched; the next step trains" if ok else
              f"changed by the skipped step: {bad[:5]}; next step moved parameters: {any(k[0]=='p' for k in moved)}"))
    rep.add('amp', f"inf gradient skipped: {name} {prec}", 'PASS' if ok else 'FAIL', detail)

def check_trains(rep:Report, dev, name, opt_func, prec='bf16', n:int=30):
    "Training with `prec` on one repeated batch: finite losses that go down"
    m,x,y = _tiny(dev)
    learn = synth_learner(m, x, y, n, opt_func, dev)
    how = apply_precision(learn, prec, dev)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-2)
    ls = [float(o) for o in learn.recorder.losses]
    first,last = statistics.fmean(ls[:3]),statistics.fmean(ls[-3:])
    ok = all(math.isfinite(v) for v in ls) and last < first
    rep.add('amp', f"trains: {name} {prec}", 'PASS' if ok else 'FAIL', f"{how}; loss {first:.3f} -> {last:.3f} over {n} steps")

def check_amp(rep:Report, dev):
    from fastai_ranger.ranger import ranger
    from fastai_ranger.ranger_lars import ranger_lars
    from fastai_ranger.adan import adan
    cuda = torch.device(dev).type == 'cuda'
    if not cuda:
        rep.add('amp', "to_fp16() inf gradient skip on CUDA", 'SKIP', "needs CUDA (fastai's MixedPrecision hard-codes "
                "autocast('cuda')/GradScaler('cuda')); the same fastai flow runs below with CPU autocast and GradScaler('cpu')")
        rep.add('amp', "to_bf16() trains on CUDA", 'SKIP', "needs CUDA; the same flow runs below with CPU bf16 autocast")
    for name,of,slow in (('ranger', ranger, True), ('ranger_lars', ranger_lars, True), ('adan', adan, False)):
        try: check_inf_skip(rep, dev, name, of, slow)
        except Exception as e: rep.add('amp', f"inf gradient skipped: {name} fp16", 'FAIL', f"{type(e).__name__}: {str(e)[:200]}")
    for name,of in (('ranger', ranger), ('adan', adan)):
        try: check_trains(rep, dev, name, of)
        except Exception as e: rep.add('amp', f"trains: {name} bf16", 'FAIL', f"{type(e).__name__}: {str(e)[:200]}")

# ---- 3. optimizer step on the device ---------------------------------------------------------------------------------
_SYNC_CALLS = ('cudaStreamSynchronize', 'cudaDeviceSynchronize', 'cudaEventSynchronize', 'cudaMemcpy', 'cuStreamSynchronize',
               'cuCtxSynchronize', 'cuMemcpyDtoH_v2')
_LAUNCH_CALLS = ('cudaLaunchKernel', 'cudaLaunchKernelExC', 'cuLaunchKernel', 'cuLaunchKernelEx', 'cudaLaunchCooperativeKernel')

def cuda_counts(step, n:int) -> dict:
    "Per step, from the CUDA profiler: kernels run, kernel-launch API calls, memcpy/memset, and host syncs (sync API calls)"
    from torch.profiler import profile, ProfilerActivity
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n): step()
        torch.cuda.synchronize()   # ours: subtracted below
    kern = copies = launches = syncs = 0
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            if e.name.startswith(('Memcpy', 'Memset')): copies += 1
            else: kern += 1
        elif e.name in _LAUNCH_CALLS: launches += 1
        elif e.name in _SYNC_CALLS: syncs += 1
    return dict(kernels=kern/n, launch_calls=launches/n, copies=copies/n, syncs=(syncs-1)/n)

def cuda_controls(dev) -> list:
    "Reasons the CUDA counts cannot be trusted here: the profiler must see the kernel of an add and the sync of an `.item()`"
    x,bad = torch.ones(1024, device=dev),[]
    c = cuda_counts(lambda: x.add_(1), 4)
    if c['kernels'] < 1: bad.append(f"no kernel seen for x.add_(1) ({c})")
    c = cuda_counts(lambda: x.sum().item(), 4)
    if c['syncs'] < 1: bad.append(f"no host sync seen for .item() ({c})")
    return bad

def check_optim(rep:Report, dev, steps:int, warmup:int, arch:str, first:bool, exclude=()):
    "The `bench_optim` table on `dev` (ratios to fused AdamW, ops and syncs, bandwidth floor), plus real CUDA counts"
    res = bench_optim.run(dev, steps, warmup, arch=arch, first=first, quiet=True, exclude=exclude)
    print(bench_optim.format_table(res), flush=True)
    cuda = torch.device(dev).type == 'cuda'
    cc = {}
    bad = cuda_controls(dev) if cuda else []
    for b in bad: rep.add('optim', "CUDA profiler counts", 'FAIL', b)
    if cuda and not bad:
        for k,r in bench_optim._candidates(torch.device(dev)).items():
            if 'reference' in k or k not in res['rows']: continue
            o = r.make(bench_optim._params(torch.device(dev), arch=arch))
            for _ in range(warmup): o.step()
            cc[k] = cuda_counts(o.step, bench_optim.LOOKAHEAD_K)
    rows = []
    for k,r in res['rows'].items():
        row = dict(optimizer=k, median_ms=r['median_ms'], x_adamw=r['x_adamw'], mean_ms=r['mean_ms'], x_adamw_mean=r['x_adamw_mean'],
                   floor_ms=r['floor_ms'], x_floor=r['x_floor'])
        for c in ('ops','ops_mean','launch_ops','syncs','reads','uploads','first_cold_s','first_warm_s','second_s'):
            if c in r: row[c] = r[c]
        if k in cc: row.update({f"cuda_{a}": b for a,b in cc[k].items()})
        rows.append(row)
        if r['ours']:
            c = dict(ops=cc[k]['kernels'] + cc[k]['copies'], syncs=cc[k]['syncs']) if k in cc else r
            what = 'CUDA kernels and copies' if k in cc else 'ops dispatched (CPU proxy)'
            v = bench_optim.verdict(dict(ops=c['ops'], syncs=c['syncs']))
            rep.add('optim', f"target {k}: <= {bench_optim.OPS_TARGET} launches, {bench_optim.SYNCS_TARGET} syncs per step",
                    v.split()[0], f"{c['ops']:g} {what}, {c['syncs']:g} host syncs per step" + (f"; {v}" if v != 'PASS' else ''))
    rep.table('optim', rows)
    rep.notes['optim'] = (f"{res['header']}; memory bandwidth {res['bw_GBps']:.1f} GB/s (in-place a += b). x floor: median step over the time "
        "its bytes take at that bandwidth. ops: top-level ops dispatched per step (typical; mean over a Lookahead cycle); "
        "launch_ops: those that launch something on a GPU (allocation and metadata ops left out); "
        "syncs = reads (device->host: item, bool, tolist) + uploads (torch.tensor of host values: a blocking copy on CUDA). "
        "On the CPU every read counts, also of step counters torch keeps on the host (AdamW foreach). "
        "cuda_*: what the CUDA profiler saw per step. A target row MISS does not fail the check.")
    return res

# ---- 4. training throughput ------------------------------------------------------------------------------------------
def canonical_model(size_out:int=10):
    "xse_resnext50 + Mish + self-attention + MaxBlurPool: the `imagenette-128-20` model"
    from fastai_ranger import models
    mk = getattr(models, 'get_model', None) or getattr(models, 'make_model')
    return mk('xse_resnext50', n_out=size_out, sa=True, pool='max', blurpool=True)

def _opt_funcs():
    from fastai.optimizer import ranger as fastai_ranger, Adam
    from fastai_ranger.ranger import ranger
    return {'ours ranger': ranger, 'fastai ranger': fastai_ranger, 'Adam': Adam}

def throughput(dev, opt:str, prec:str, cl:bool, comp:bool, bs:int, size:int, warmup:int, steps:int) -> dict:
    "Images/s of training steps of the canonical model on one device-resident batch, timed after `warmup` steps"
    from fastai.callback.core import Callback, CancelValidException
    class Clock(Callback):
        order = 99
        def before_batch(self):
            if self.training and self.iter == warmup: _sync(dev); self.t0 = time.perf_counter()
        def after_train(self): _sync(dev); self.t1 = time.perf_counter()
        def before_validate(self): raise CancelValidException()   # no eval-mode pass (under torch.compile: a second compile)
    torch.manual_seed(0)
    m = canonical_model()
    x,y = torch.randn(bs, 3, size, size, device=dev),torch.randint(0, 10, (bs,), device=dev)
    if cl: m,x = m.to(memory_format=torch.channels_last),x.contiguous(memory_format=torch.channels_last)
    m = m.to(dev)
    if comp: m = torch.compile(m)
    clock = Clock()
    learn = synth_learner(m, x, y, warmup+steps, _opt_funcs()[opt], dev, cbs=[clock])
    how = apply_precision(learn, prec, dev)
    if cl: learn.to_channelslast(use_amp=False)
    if torch.device(dev).type == 'cuda': torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with learn.no_bar(), learn.no_logging(): learn.fit_flat_cos(1, 1e-3)
    ls = [float(o) for o in learn.recorder.losses]
    r = dict(opt=opt, precision=how, channels_last=cl, compile=comp, bs=bs, size=size, steps=steps,
             img_s=steps*bs/(clock.t1-clock.t0), step_ms=(clock.t1-clock.t0)/steps*1e3, wall_s=time.perf_counter()-t0,
             finite=all(math.isfinite(v) for v in ls))
    if torch.device(dev).type == 'cuda': r['peak_GB'] = torch.cuda.max_memory_allocated()/2**30
    return r

def grid(kind:str, cuda:bool) -> list:
    "(opt, precision, channels_last, compile) rows: 'smoke', 'default' (fits the 8-minute budget) or 'full' (every combination)"
    opts = list(_opt_funcs())
    if kind == 'full': return list(itertools.product(opts, ('fp16','bf16'), (False, True), (False, True)))
    if kind == 'smoke': return [(o, 'bf16', False, False) for o in opts] + [('ours ranger', 'bf16', True, False)]
    return ([(o, 'fp16', True, False) for o in opts] + [('ours ranger', 'bf16', True, False), ('ours ranger', 'fp16', False, False),
            ('ours ranger', 'bf16', False, False), ('ours ranger', 'fp16', True, True)])

def check_train(rep:Report, dev, kind:str, bs:int, size:int, warmup:int, steps:int, row_s:float, compile_s:float, reserve:float=0):
    "Throughput rows of `grid(kind)`, each skipped (with the reason) if it would eat into the budget (less `reserve` for the real run)"
    rows,cuda = [],torch.device(dev).type == 'cuda'
    if cuda: torch.backends.cudnn.benchmark = True
    for opt,prec,cl,comp in grid(kind, cuda):
        name = f"{opt} {prec} channels_last={cl} compile={comp}"
        need = compile_s if comp else row_s
        if rep.left() - reserve < need:
            rep.add('train', name, 'SKIP', f"budget: {rep.left():.0f} s left ({reserve:.0f} s kept for the real run), "
                    f"this row needs about {need:.0f} s"); continue
        try:
            r = throughput(dev, opt, prec, cl, comp, bs, size, warmup, steps)
            rows.append(r)
            rep.add('train', name, 'PASS' if r['finite'] else 'FAIL', f"{r['img_s']:.1f} img/s ({r['step_ms']:.1f} ms/step, {r['wall_s']:.0f} s)")
        except Exception as e: rep.add('train', name, 'FAIL', f"{type(e).__name__}: {str(e)[:200]}")
    base = {(r['precision'], r['channels_last'], r['compile']): r['img_s'] for r in rows if r['opt'] == 'fastai ranger'}
    for r in rows:
        b = base.get((r['precision'], r['channels_last'], r['compile']))
        if b: r['x_fastai_ranger'] = r['img_s']/b
    rep.table('train', rows)
    rep.notes['train'] = (f"Canonical imagenette-128-20 model (xse_resnext50, Mish, self-attention, MaxBlurPool), bs {bs}, "
        f"{size} px, one device-resident synthetic batch, fastai Learner with fit_flat_cos, {steps} timed steps after {warmup}. "
        "x_fastai_ranger: images/s over fastai's built-in ranger in the same setting (the training-level speedup).")

# ---- 5. a real run ---------------------------------------------------------------------------------------------------
def check_real(rep:Report, data:str, out:Path, smoke:bool, min_s:float):
    "`imagenette-128-5` on `data`, timed, its accuracy next to the leaderboard cell"
    from fastai_ranger.train import train_recipe
    if not smoke and rep.left() < min_s:
        rep.add('real', 'imagenette-128-5', 'SKIP', f"budget: {rep.left():.0f} s left, the run needs about {min_s:.0f} s"); return
    kw = dict(epochs=1, bs=8, max_train_batches=2, max_valid_batches=1, workers=0) if smoke else {}
    t0 = time.perf_counter()
    res = train_recipe(recipe='imagenette-128-5', data=data, out=out/'imagenette-128-5', quiet=True, **kw)
    wall = time.perf_counter() - t0
    s,src = res['summary'],res.get('source', {})
    acc,target = s.get('accuracy_mean'),s.get('target') or LEADERBOARD_128_5
    run = (res.get('runs') or [{}])[0]
    row = dict(recipe='imagenette-128-5', accuracy=acc, leaderboard=target, diff=None if acc is None else acc-target,
               wall_s=wall, img_s=run.get('images_per_s'), precision=run.get('precision'), data=src.get('path', data),
               data_copy=src.get('copy'), comparable=s.get('comparable'))
    rep.table('real', [row])
    ok = acc is not None and math.isfinite(acc)
    rep.add('real', 'imagenette-128-5' + (' (smoke: 2 batches of 1 epoch)' if smoke else ''), 'PASS' if ok else 'FAIL',
            f"accuracy {acc if acc is None else round(acc, 2)} % vs leaderboard {target} % in {wall:.0f} s; data copy {src.get('copy')}")

# ---- main ------------------------------------------------------------------------------------------------------------
def _meta(a, dev, argv) -> dict:
    import fastai, fastai_ranger
    name = torch.cuda.get_device_name() if torch.device(dev).type == 'cuda' else f"CPU ({platform.processor() or platform.machine()})"
    return dict(mode='smoke' if a.smoke else 'full', device=str(dev), device_name=name, torch=torch.__version__,
                fastai=fastai.__version__, fastai_ranger=fastai_ranger.__version__, platform=platform.platform(),
                cpus=os.cpu_count(), threads=torch.get_num_threads(), argv=list(argv),
                when=time.strftime('%Y-%m-%d %H:%M:%S %Z'), budget_s=a.budget)

def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--out', help='folder for gpu_check.json and gpu_check.md (required unless --smoke)')
    ap.add_argument('--data', help='Imagenette folder (train/ and val/): also run imagenette-128-5 on it')
    ap.add_argument('--smoke', action='store_true', help='CPU, tiny sizes, few steps: the CI run that keeps this script working')
    ap.add_argument('--device', help='default: cuda if available (cpu with --smoke)')
    ap.add_argument('--sections', nargs='*', default=list(SECTIONS), help=f"subset of {' '.join(SECTIONS)}")
    ap.add_argument('--budget', type=float, help='seconds for everything (default 420; 110 with --smoke): later rows are skipped')
    ap.add_argument('--dtypes', nargs='*', help='exactness dtypes (default fp64 fp32 bf16; fp64 fp32 with --smoke)')
    ap.add_argument('--exact-only', nargs='*', help='substrings of the exactness cases to run (default all)')
    ap.add_argument('--exact-steps', type=int, default=12, help='optimizer steps per exactness trajectory (2 Lookahead cycles)')
    ap.add_argument('--bench-steps', type=int, help='timed optimizer steps (default 24; 2 with --smoke)')
    ap.add_argument('--bench-warmup', type=int, help='untimed optimizer steps first (>= 6: RAdam rectified; default 8, 6 with --smoke)')
    ap.add_argument('--bench-arch', help='fastai xresnet whose parameters the optimizer bench steps (default xresnet50; xresnet18 with --smoke)')
    ap.add_argument('--bench-exclude', nargs='*', help="substrings of optimizer rows to leave out (default none; '(reference)' 'foreach' with --smoke)")
    ap.add_argument('--first-step', action='store_true', help='also time each optimizer\'s first step cold and warm (slow)')
    ap.add_argument('--grid', choices=('smoke','default','full'), help='throughput rows (default: default; smoke with --smoke)')
    ap.add_argument('--bs', type=int, help='throughput batch size (default 64; 2 with --smoke)')
    ap.add_argument('--size', type=int, help='throughput image size (default 128; 64 with --smoke)')
    ap.add_argument('--train-steps', type=int, help='timed training steps per row (default 30; 2 with --smoke)')
    ap.add_argument('--train-warmup', type=int, help='untimed training steps per row (default 10; 1 with --smoke)')
    ap.add_argument('--row-s', type=float, help='seconds a throughput row is expected to take (budget check; default 20, 5 with --smoke)')
    ap.add_argument('--compile-s', type=float, default=150, help='seconds a torch.compile row is expected to take (budget check)')
    ap.add_argument('--real-min-s', type=float, default=150, help='skip the real run with less budget than this left')
    a = ap.parse_args(argv)
    sm = a.smoke
    dflt = dict(budget=110 if sm else 420, dtypes=['fp64','fp32'] if sm else ['fp64','fp32','bf16'], bench_steps=2 if sm else 24, bench_warmup=6 if sm else 8,
                bench_arch='xresnet18' if sm else 'xresnet50', bench_exclude=['(reference)', 'foreach'] if sm else [], grid='smoke' if sm else 'default', bs=2 if sm else 64,
                size=64 if sm else 128, train_steps=2 if sm else 30, train_warmup=1 if sm else 10, row_s=5 if sm else 20)
    for k,v in dflt.items():
        if getattr(a, k) is None: setattr(a, k, v)
    if a.out is None and not sm: ap.error("--out DIR is required (the folder for gpu_check.json and gpu_check.md)")
    bad = [s for s in a.sections if s not in SECTIONS]
    if bad: ap.error(f"unknown section(s) {bad}; choose from {' '.join(SECTIONS)}")
    bad = [d for d in a.dtypes if d not in _DT]
    if bad: ap.error(f"unknown dtype(s) {bad}; choose from {' '.join(_DT)}")
    for n in ('exact_steps','bench_steps','bs','train_steps'):
        if getattr(a, n) < 1: ap.error(f"--{n.replace('_','-')} must be >= 1, got {getattr(a, n)}")
    if a.size < 32: ap.error(f"--size must be >= 32, got {a.size}")
    if a.bench_warmup < 0: ap.error(f"--bench-warmup must be >= 0, got {a.bench_warmup}")
    from fastai.vision.models import xresnet
    if not callable(getattr(xresnet, a.bench_arch, None)): ap.error(f"--bench-arch {a.bench_arch}: not a fastai xresnet (e.g. xresnet18, xresnet50)")
    if a.data is not None and not Path(a.data).is_dir(): ap.error(f"--data {a.data}: no such folder")
    if a.device is None: a.device = 'cpu' if sm or not torch.cuda.is_available() else 'cuda'
    if a.device.startswith('cuda') and not torch.cuda.is_available(): ap.error(f"--device {a.device}: CUDA is not available here")
    return a

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    a = parse(argv)
    out = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix='gpu_check-'))
    out.mkdir(parents=True, exist_ok=True)
    dev = a.device
    rep = Report(a.budget)
    meta = _meta(a, dev, argv)
    if torch.device(dev).type != 'cuda':
        rep.add('exact', 'CUDA device', 'SKIP', f"no CUDA here: every section runs on {dev} (the GPU run is `--out DIR` on a GPU machine)")
    steps = {'exact': lambda: check_exact(rep, dev, a.dtypes, a.exact_steps, a.exact_only),
             'amp': lambda: check_amp(rep, dev),
             'optim': lambda: check_optim(rep, dev, a.bench_steps, a.bench_warmup, a.bench_arch, a.first_step, a.bench_exclude),
             'train': lambda: check_train(rep, dev, a.grid, a.bs, a.size, a.train_warmup, a.train_steps, a.row_s, a.compile_s,
                                          a.real_min_s if a.data and 'real' in a.sections and not a.smoke else 0),
             'real': lambda: check_real(rep, a.data, out, a.smoke, a.real_min_s) if a.data else
                             rep.add('real', 'imagenette-128-5', 'SKIP', 'no --data FOLDER given')}
    for s in SECTIONS:
        if s not in a.sections: continue
        t0 = time.perf_counter()
        print(f"== {s} ({rep.elapsed():.0f} s so far)", flush=True)
        try: steps[s]()
        except Exception as e:
            traceback.print_exc()
            rep.add(s, f"section {s}", 'ERROR', f"{type(e).__name__}: {str(e)[:300]}")
        rep.times[s] = time.perf_counter() - t0
        (out/'gpu_check.json').write_text(json.dumps(rep.to_json(meta), indent=1, default=str))   # partial results survive a kill
    (out/'gpu_check.json').write_text(json.dumps(rep.to_json(meta), indent=1, default=str))
    (out/'gpu_check.md').write_text(rep.to_md(meta))
    j = rep.to_json(meta)
    print(f"gpu_check: {j['counts']} in {j['wall_s']:.0f} s; report in {out/'gpu_check.md'}")
    if rep.failed: print("FAILED: " + '; '.join(f"[{c['section']}] {c['name']}" for c in rep.failed), file=sys.stderr)
    return 1 if rep.failed else 0

if __name__ == '__main__': sys.exit(main())

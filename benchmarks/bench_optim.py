"""Time one optimizer step on xresnet50's parameters and print each as a ratio to fused AdamW measured in the same run.

Usage: python benchmarks/bench_optim.py [--steps 24] [--warmup 8] [--device cpu|cuda] [--only NAME ...]
"""
from __future__ import annotations
import argparse, statistics, time
import torch
from fastai.vision.models.xresnet import xresnet50

def _sync(dev):
    if dev.type == 'cuda': torch.cuda.synchronize()

def _params(dev, seed=0):
    torch.manual_seed(seed)
    ps = [p.detach().to(dev).requires_grad_() for p in xresnet50(n_out=10).parameters()]
    g = torch.Generator(device=dev).manual_seed(seed)
    for p in ps: p.grad = torch.randn(p.shape, generator=g, device=dev)*1e-2
    return ps

def _candidates():
    "name -> factory(params) returning an object with .step()"
    from fastai.optimizer import ranger as fastai_ranger
    from fastai_ranger.ranger import Ranger
    c = {'AdamW fused': lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=1e-2, fused=True),
         'AdamW foreach': lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=1e-2, foreach=True),
         'fastai ranger': lambda ps: fastai_ranger(ps, lr=1e-3),
         'Ranger (fast)': lambda ps: Ranger(ps, lr=1e-3),
         'Ranger (reference)': lambda ps: Ranger(ps, lr=1e-3, foreach=False)}
    try:
        from fastai_ranger.ranger_lars import RangerLARS
        c['RangerLARS (fast)'] = lambda ps: RangerLARS(ps, lr=1e-3)
        c['RangerLARS (reference)'] = lambda ps: RangerLARS(ps, lr=1e-3, foreach=False)
    except ImportError as e: print(f"RangerLARS not available: {e}")
    try:
        from fastai_ranger.adan import Adan
        c['Adan (fast)'] = lambda ps: Adan(ps, lr=1e-3, weight_decay=0.02)
    except ImportError as e: print(f"Adan not available: {e}")
    return c

def time_all(makers:dict, dev, steps, warmup) -> dict:
    "Seconds of every timed `step()` of each optimizer, timed round-robin (one step of each per round) so load drifts hit all alike"
    opts = {k: make(_params(dev)) for k,make in makers.items()}
    for _ in range(warmup):
        for o in opts.values(): o.step()
    _sync(dev); ts = {k: [] for k in opts}
    for _ in range(steps):
        for k,o in opts.items():
            t0 = time.perf_counter(); o.step(); _sync(dev); ts[k].append(time.perf_counter() - t0)
    return ts

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--steps', type=int, default=24, help='timed steps per optimizer (use a multiple of 6 for whole Lookahead cycles)')
    ap.add_argument('--warmup', type=int, default=8, help='untimed steps first (>= 6 so RAdam is rectified)')
    ap.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    ap.add_argument('--only', nargs='*', help='substrings of the rows to run (AdamW fused always runs)')
    a = ap.parse_args(argv)
    dev = torch.device(a.device)
    n = sum(p.numel() for p in _params(dev))
    print(f"device={dev} threads={torch.get_num_threads()} torch={torch.__version__} params={n/1e6:.2f}M steps={a.steps} warmup={a.warmup}")
    cands = _candidates()
    if a.only: cands = {k:v for k,v in cands.items() if k == 'AdamW fused' or any(s in k for s in a.only)}
    res = time_all(cands, dev, a.steps, a.warmup)
    med = {k: statistics.median(v) for k,v in res.items()}
    mean = {k: statistics.fmean(v) for k,v in res.items()}
    print("median: a typical step; mean: amortised over the timed steps, Lookahead syncs (every k=6 steps) included")
    print(f"{'optimizer':<24}{'median ms':>10}{'x AdamW':>9}{'mean ms':>10}{'x AdamW':>9}")
    for name in res:
        print(f"{name:<24}{med[name]*1e3:>10.2f}{med[name]/med['AdamW fused']:>9.2f}"
              f"{mean[name]*1e3:>10.2f}{mean[name]/mean['AdamW fused']:>9.2f}")

if __name__ == '__main__': main()

#!/usr/bin/env python
"""Forward+backward throughput (images/s) of the recipe models, with and without MaxBlurPool and self-attention,
printed as ratios to plain xresnet50 measured in the same run.

    python benchmarks/bench_models.py --size 128 --bs 16 --steps 3 --device cpu
"""
import argparse, time, statistics
import torch
from torch import nn
from fastai_ranger.models import make_model

VARIANTS = [
    ('xresnet50', {}),
    ('xresnet50', dict(sa=True)),
    ('xresnet50', dict(blurpool=True)),
    ('xresnet50', dict(sa=True, pool='max', blurpool=True)),
    ('xse_resnext50', dict(sa=True, pool='max')),
    ('xse_resnext50', dict(sa=True, pool='max', blurpool=True)),
    ('xresnet50_trick', dict(sa=True, blurpool=True)),
    ('xresnet18', {}),
]

def bench(name, kw, size, bs, steps, device, channels_last):
    "Median seconds per forward+backward step"
    m = make_model(name, **kw).to(device)
    x = torch.randn(bs, 3, size, size, device=device)
    y = torch.randint(0, 10, (bs,), device=device)
    if channels_last: m, x = m.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    times = []
    for i in range(steps + 1):
        if device == 'cuda': torch.cuda.synchronize()
        t = time.perf_counter()
        nn.functional.cross_entropy(m(x), y).backward()
        m.zero_grad(set_to_none=True)
        if device == 'cuda': torch.cuda.synchronize()
        if i: times.append(time.perf_counter() - t)  # first step is warm-up
    return statistics.median(times)

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--size', type=int, default=128)
    ap.add_argument('--bs', type=int, default=16)
    ap.add_argument('--steps', type=int, default=3)
    ap.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    ap.add_argument('--channels-last', action='store_true')
    a = ap.parse_args()
    print(f"device {a.device}, {a.size} px, batch {a.bs}, median of {a.steps} steps, torch {torch.__version__}, threads {torch.get_num_threads()}")
    base = None
    print(f"{'model':<16}{'options':<40}{'img/s':>9}{'time ratio vs xresnet50':>26}")
    for name, kw in VARIANTS:
        s = bench(name, kw, a.size, a.bs, a.steps, a.device, a.channels_last)
        base = base or s
        opts = ', '.join(f'{k}={v}' for k, v in kw.items()) or '-'
        print(f"{name:<16}{opts:<40}{a.bs/s:>9.1f}{s/base:>25.2f}x")

if __name__ == '__main__': main()

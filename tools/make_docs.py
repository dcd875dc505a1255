#!/usr/bin/env python
"""Render the notebooks in nbs/ to Markdown pages in docs/ and README.md, without Quarto.

nbdev's own notebook processing (`nbdev.serve.proc_nbs`: show_doc rendering, directive handling, hidden cells
removed) writes processed notebooks to `_proc/`; nbconvert's Markdown exporter then turns each into a page.
`--check` regenerates into a temporary folder and fails if README.md or docs/ differ from what is committed.

Figures: notebooks are committed without outputs, so a code cell that should show a figure in the docs carries
`#| docfig: NAME`. Such a cell must be self-contained (its own imports); it is run here in a fresh namespace with
matplotlib's Agg backend, its current figure is saved to `docs/figures/NAME.png` (no timestamp or version metadata,
so the bytes only change when the picture does) and the page shows the image after the cell's code.
Where Quarto exists, `nbdev-docs` builds the full site from the same notebooks and `nbs/_quarto.yml`.
"""
import argparse, filecmp, os, re, shutil, sys, tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

def _proc(tmp:Path) -> Path:
    "Run nbdev's doc processors on every notebook in nbs/, output under `tmp`"
    from nbdev.config import get_config
    from nbdev.serve import proc_nbs
    import nbdev.serve
    cfg = get_config(ROOT)
    os.chdir(ROOT)
    cache = proc_nbs(cfg.nbs_path, n_workers=0)
    out = tmp/'_proc'
    shutil.copytree(cache, out)
    return out

def _strip_frontmatter(md:str) -> str:
    "Turn Quarto front matter (title/description) into a Markdown heading"
    m = re.match(r'^---\n(.*?)\n---\n', md, flags=re.S)
    if not m: return md
    import yaml
    meta = yaml.safe_load(m.group(1)) or {}
    head = f"# {meta['title']}\n\n" if meta.get('title') else ''
    if meta.get('description'): head += f"> {' '.join(str(meta['description']).split())}\n\n"
    return head + md[m.end():].lstrip()

_CELL_KEYS = {'cell_type', 'id', 'metadata', 'source', 'outputs', 'execution_count', 'attachments'}

_DOCFIG = re.compile(r'#\|\s*docfig:\s*([\w-]+)')

def _render_fig(src:str, fn:Path):
    "Run the self-contained figure cell `src` and save its current matplotlib figure to `fn`"
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    plt.close('all'); plt.rcParams.update(matplotlib.rcParamsDefault); matplotlib.use('Agg')
    exec(compile(src, str(fn), 'exec'), {'__name__': '__docfig__'})
    fn.parent.mkdir(parents=True, exist_ok=True)
    plt.gcf().savefig(fn, dpi=80, metadata={'Software': None})
    plt.close('all')

def _figures(nb, figdir:Path):
    "Render every `#| docfig: NAME` cell of `nb` to `figdir/NAME.png` and show it after the cell"
    import nbformat
    cells = []
    for c in nb.cells:
        cells.append(c)
        m = _DOCFIG.search(c.source) if c.cell_type == 'code' else None
        if m is None: continue
        name = m.group(1)
        _render_fig('\n'.join(l for l in c.source.splitlines() if not l.startswith('#|')), figdir/f'{name}.png')
        cells.append(nbformat.v4.new_markdown_cell(f'![{name}](figures/{name}.png)'))
    nb.cells = cells
    return nb

def _clean(nb):
    "Drop nbdev's extra cell keys and volatile metadata; honour Quarto `echo: false`; strip `#|` directives"
    for c in nb.cells:
        for k in [k for k in c if k not in _CELL_KEYS]: del c[k]
        c.metadata = {}
        if c.cell_type != 'code': continue
        lines = c.source.splitlines()
        dirs = [l for l in lines if l.startswith('#|')]
        c.source = '\n'.join(l for l in lines if not l.startswith('#|')).strip()
        if any(re.match(r'#\|\s*echo:\s*false', d) for d in dirs): c.metadata['tags'] = ['remove_input']
        # notebooks are committed without outputs; only show_doc's rendered API docs are kept, so pages are
        # deterministic (cells nbdev runs for show_doc, such as imports, may print progress bars or timings)
        if not c.source.startswith('show_doc('): c.outputs = []
        for o in c.get('outputs', []):
            if 'execution_count' in o: o['execution_count'] = None
            if 'metadata' in o: o['metadata'] = {}
    return nb

def _to_md(nb:Path, figdir:Path) -> str:
    "Convert one processed notebook to Markdown"
    from nbconvert import MarkdownExporter
    from traitlets.config import Config
    import nbformat
    c = Config()
    c.TagRemovePreprocessor.remove_input_tags = ('remove_input',)
    c.TagRemovePreprocessor.enabled = True
    c.MarkdownExporter.preprocessors = ['nbconvert.preprocessors.TagRemovePreprocessor']
    nbf = _clean(_figures(nbformat.read(nb, as_version=4), figdir))
    body,_ = MarkdownExporter(config=c).from_notebook_node(nbf)
    body = re.sub(r'\n{3,}', '\n\n', _strip_frontmatter(body)).strip() + '\n'
    return body

def render(dest:Path):
    "Write docs/*.md, docs/figures/*.png and README.md for the current notebooks under `dest`"
    shutil.rmtree(dest/'docs'/'figures', ignore_errors=True)  # figures of removed cells go too
    with tempfile.TemporaryDirectory() as tmp:
        proc = _proc(Path(tmp))
        (dest/'docs').mkdir(parents=True, exist_ok=True)
        for nb in sorted(proc.glob('*.ipynb')):
            md = _to_md(nb, dest/'docs'/'figures')
            if nb.name == 'index.ipynb': (dest/'README.md').write_text(md)
            else: (dest/'docs'/(nb.stem + '.md')).write_text(md)

def _same_png(a:Path, b:Path) -> bool:
    "Same picture: identical bytes, or (another font rasteriser) same size and nearly the same pixels"
    if filecmp.cmp(a, b, shallow=False): return True
    import numpy as np
    from PIL import Image
    x,y = (np.asarray(Image.open(f).convert('RGB'), dtype=np.float32) for f in (a, b))
    return x.shape == y.shape and float(np.abs(x-y).mean()) < 2.

def check() -> int:
    "Fail if committed README.md/docs differ from a fresh render"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        render(tmp)
        bad = [] if filecmp.cmp(tmp/'README.md', ROOT/'README.md', shallow=False) else ['README.md']
        new = {p.name for p in (tmp/'docs').glob('*.md')}
        old = {p.name for p in (ROOT/'docs').glob('*.md')}
        bad += [f'docs/{n}' for n in sorted(new ^ old)]
        bad += [f'docs/{n}' for n in sorted(new & old) if not filecmp.cmp(tmp/'docs'/n, ROOT/'docs'/n, shallow=False)]
        newf = {p.name for p in (tmp/'docs'/'figures').glob('*.png')}
        oldf = {p.name for p in (ROOT/'docs'/'figures').glob('*.png')}
        bad += [f'docs/figures/{n}' for n in sorted(newf ^ oldf)]
        bad += [f'docs/figures/{n}' for n in sorted(newf & oldf) if not _same_png(tmp/'docs'/'figures'/n, ROOT/'docs'/'figures'/n)]
    if bad: print('Docs out of date (run `python tools/make_docs.py`):', *bad, sep='\n  ')
    else: print('README.md and docs/ match the notebooks.')
    return 1 if bad else 0

if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--check', action='store_true', help='verify README.md and docs/ are up to date')
    a = ap.parse_args()
    sys.exit(check() if a.check else render(ROOT))

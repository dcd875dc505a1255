"`from fastai_ranger.all import *` after fastai's star imports: it adds names and replaces none but `ranger`"
import inspect, json, subprocess, sys, textwrap
import pytest
from conftest import child_env

# fastai/fastcore names that `fastai_ranger.all` may replace, and why: each must be a drop-in replacement
ALLOWED = {'ranger': "our opt_func computes fastai's `ranger` (RAdam + Lookahead) with the same keywords, faster"}

SNIPPET = textwrap.dedent('''
    import json
    ns = {}
    exec("from fastcore.all import *", ns)
    exec("from fastai.vision.all import *", ns)
    before = dict(ns)
    exec("from fastai_ranger.all import *", ns)
    import fastai_ranger.all as m
    print(json.dumps(dict(changed=sorted(k for k in before if ns[k] is not before[k]),
                          unresolved=[n for n in m.__all__ if not hasattr(m, n)],
                          exported=list(m.__all__), added=sorted(set(ns) - set(before) - {"__builtins__"}))))
''')

@pytest.fixture(scope='module')
def star():
    "The star imports run in a fresh interpreter, as a user's notebook runs them"
    r = subprocess.run([sys.executable, '-c', SNIPPET], capture_output=True, text=True, timeout=300, env=child_env())
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])

def test_no_fastai_or_fastcore_name_replaced(star):
    replaced = [n for n in star['changed'] if n not in ALLOWED]
    assert not replaced, f"from fastai_ranger.all import * replaces fastai/fastcore names {replaced}"

def test_all_resolves_and_adds_only_all(star):
    assert not star['unresolved'], f"names in fastai_ranger.all.__all__ that do not exist: {star['unresolved']}"
    assert len(star['exported']) == len(set(star['exported']))
    assert set(star['added']) <= set(star['exported'])

def test_public_api_only(star):
    "The CLI's and the fast paths' helpers stay in their modules; the model factory has a name of its own"
    exported = set(star['exported'])
    for n in ['fit', 'train', 'train_run', 'main', 'summarize', 'alias', 'Compiled', 'FlatState', 'Lookahead', 'get_model',
              'find_bs', 'atomic_save']:
        assert n not in exported, n
    for n in ['Ranger', 'ranger', 'RangerLARS', 'ranger_lars', 'LARS', 'lars', 'Adan', 'adan', 'lookahead', 'make_model',
              'get_dls', 'get_recipe', 'RECIPES', 'CheckpointCallback', 'ResumeCallback', 'train_recipe', 'fit_sched']:
        assert n in exported, n

def test_models_get_model_alias():
    from fastai_ranger import models
    assert models.get_model is models.make_model and 'get_model' not in models.__all__

def _params(f): return inspect.signature(f).parameters

@pytest.mark.parametrize('name', sorted(ALLOWED))
def test_allowed_replacements_are_drop_in(name):
    "A replaced name accepts every argument of fastai's, positional ones in fastai's order"
    import fastai.vision.all as fv, fastai_ranger.all as fr
    ours, theirs = _params(getattr(fr, name)), _params(getattr(fv, name))
    missing = [k for k in theirs if k not in ours]
    assert not missing, f"{name} lacks fastai's arguments {missing}"
    pos = lambda ps: [k for k,p in ps.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    assert pos(ours)[:len(pos(theirs))] == pos(theirs), f"{name}: positional order {pos(ours)} vs fastai's {pos(theirs)}"

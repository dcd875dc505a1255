"Data: dataset layouts, the generated sample, the recipe transforms and bad images, on the real mini Imagenette and on the sample"
import shutil, tarfile
from pathlib import Path
import numpy as np, pandas as pd, pytest, torch
from fastai_ranger.data import *
from fastai_ranger.data import _draw


@pytest.fixture(scope='module')
def sample(tmp_path_factory):
    return make_sample_dataset(tmp_path_factory.mktemp('s')/'sample', n_train=12, n_valid=4, size=64, seed=0)

def test_mini_layout_and_source(mini):
    path,df,src = resolve_data(mini, 'imagenette', size=128)
    assert (len(df), int(df.is_valid.sum())) == (700, 200)
    assert sorted(df.label.unique()) == WNIDS['imagenette']
    assert src['kind'] == 'folder' and src['copy'] == '160' and src['n_classes'] == 10
    assert '320' in src['note']  # the 128 px record used the 320 px copy

def test_layout_errors(tmp_path):
    with pytest.raises(DataError, match='does not exist'): check_layout(tmp_path/'missing')
    (tmp_path/'f.txt').write_text('x')
    with pytest.raises(DataError, match='is not a folder'): check_layout(tmp_path/'f.txt')
    with pytest.raises(DataError, match='lacks train/ and val/'): check_layout(tmp_path)
    (tmp_path/'val').mkdir()
    with pytest.raises(DataError, match='lacks train/'): check_layout(tmp_path)
    (tmp_path/'train').mkdir()
    with pytest.raises(DataError, match='no class folders'): check_layout(tmp_path)

def test_csv_only_layout(tmp_path, sample):
    "A folder with only images and a noisy_*.csv (no train/val split folders) works; a broken csv is named"
    (tmp_path/'imgs').mkdir()
    rows = []
    for i,p in enumerate(sorted(sample.glob('*/*/*.JPEG'))):
        shutil.copy(p, tmp_path/'imgs'/p.name)
        rows.append(dict(path=f'imgs/{p.name}', noisy_labels_0=p.parent.name, is_valid=p.parent.parent.name=='val'))
    pd.DataFrame(rows).to_csv(tmp_path/'noisy_imagenette.csv', index=False)
    df = check_layout(tmp_path)
    assert len(df) == 160 and int(df.is_valid.sum()) == 40
    dls = get_dls(32, bs=8, data=tmp_path, workers=0, device='cpu')
    assert dls.one_batch()[0].shape == (8,3,32,32)
    pd.DataFrame(rows).drop(columns='is_valid').to_csv(tmp_path/'noisy_imagenette.csv', index=False)
    with pytest.raises(DataError, match='is_valid'): check_layout(tmp_path)

def test_sample_deterministic_and_distinct(tmp_path, sample):
    again = make_sample_dataset(tmp_path/'again', n_train=12, n_valid=4, size=64, seed=0)
    files = sorted(p.relative_to(sample) for p in sample.glob('*/*/*.JPEG'))
    assert len(files) == 160
    assert all((sample/f).read_bytes() == (again/f).read_bytes() for f in files)
    other = make_sample_dataset(tmp_path/'other', n_train=1, n_valid=1, size=64, seed=1)
    assert (other/files[0]).read_bytes() != (sample/files[0]).read_bytes()
    # classes are visually distinct: a nearest-centroid classifier on crude features beats chance by far
    rng = np.random.default_rng(0)
    def feat(im):
        a = np.asarray(im.convert('L').resize((32,32)), dtype=np.float32)/255
        gx,gy = np.abs(np.diff(a,axis=1)).mean(), np.abs(np.diff(a,axis=0)).mean()
        f = np.abs(np.fft.fft2(a-a.mean()))[:8,:8].ravel()
        return np.concatenate([[gx,gy,gx/(gy+1e-3)], f/ (f.sum()+1e-6)])
    X = np.array([[feat(_draw(c, 64, rng)) for _ in range(40)] for c in range(10)])
    cent = X[:,:30].mean(1)
    pred = np.array([[np.argmin(((cent-x)**2).sum(1)) for x in X[c,30:]] for c in range(10)])
    acc = (pred == np.arange(10)[:,None]).mean()
    assert acc > 0.5, acc

def test_sample_via_data_arg(tmp_path, monkeypatch):
    monkeypatch.setenv('FASTAI_RANGER_SAMPLE', str(tmp_path))
    dls = get_dls(32, bs=16, data='sample', dataset='imagewoof', workers=0, device='cpu')
    assert dls.source['kind'] == 'sample' and dls.source['copy'] == 'sample'
    assert list(dls.vocab) == WNIDS['imagewoof']
    assert (tmp_path/'fastai_ranger_sample_imagewoof'/'noisy_imagewoof.csv').exists()
    assert get_sample('imagewoof') == tmp_path/'fastai_ranger_sample_imagewoof'  # reused, not regenerated

def test_recipe_transforms_on_real_images(mini):
    dls = get_dls(128, bs=8, data=mini, workers=0, device='cpu', max_train=16, max_valid=16)
    xb,yb = dls.one_batch()
    assert xb.shape == (8,3,128,128) and xb.dtype == torch.float32 and 0 <= xb.min() and xb.max() <= 1
    assert dls.source['train_tfm'] == 'RandomResizedCrop(128, min_scale=0.35)+flip'
    assert dls.source['valid_tfm'] == 'squish to 152 then centre crop 128'
    v1,v2 = dls.valid.one_batch()[0], dls.valid.one_batch()[0]
    assert torch.equal(v1, v2)  # validation is deterministic
    n = get_dls(128, bs=8, data=mini, workers=0, device='cpu', normalize=True, max_train=8, max_valid=8)
    assert n.one_batch()[0].min() < 0

def test_tgz(tmp_path, mini):
    arc = tmp_path/'imagenette2-160.tgz'
    with tarfile.open(arc, 'w:gz') as t: t.add(mini, arcname='imagenette2-160')
    path,df,src = resolve_data(arc)
    assert src['kind'] == 'archive' and len(df) == 700 and src['copy'] == '160'
    bad = tmp_path/'broken.tgz'; bad.write_bytes(arc.read_bytes()[:1000])
    with pytest.raises(DataError, match='broken.tgz'): resolve_data(bad)

def _corrupt(ds:Path) -> Path:
    f = sorted((ds/'train'/WNIDS['imagenette'][3]).iterdir())[0]
    f.write_bytes(f.read_bytes()[:200])
    return f

def test_bad_image_named_in_worker(tmp_path, sample):
    "A truncated JPEG read in a DataLoader worker process fails with its file name"
    ds = tmp_path/'ds'; shutil.copytree(sample, ds); f = _corrupt(ds)
    dls = get_dls(32, bs=120, data=ds, workers=2, device='cpu')  # one batch holds every training image
    with pytest.raises(Exception, match=f.name): dls.train.one_batch()

def test_check_and_skip_bad(tmp_path, sample):
    ds = tmp_path/'ds'; shutil.copytree(sample, ds); f = _corrupt(ds)
    with pytest.raises(BadImageError, match=f.name): get_dls(32, bs=8, data=ds, workers=0, device='cpu', check_images=True)
    with pytest.warns(UserWarning, match=f.name):
        dls = get_dls(32, bs=8, data=ds, workers=0, device='cpu', skip_bad=True)
    assert len(dls.train_ds) == 119 and dls.source['skipped_bad'] == 1
    for _ in dls.train: pass

PREDICT = '''
import sys, warnings
from pathlib import Path
from fastai.vision.all import load_learner, PILImage
warnings.simplefilter('ignore')
learn, fn = load_learner(sys.argv[1]), Path(sys.argv[2])
for x in (fn, str(fn), PILImage.create(fn)):
    lbl, idx, probs = learn.predict(x)
    assert lbl in learn.dls.vocab and probs.shape == (10,), (lbl, probs.shape)
print(len(learn.dls.test_dl([fn, str(fn)]).one_batch()[0]))
'''

def test_predict_after_load_learner_in_a_fresh_process(tmp_path, sample):
    "A learner on `get_dls` data, exported, predicts on a Path, a str and a PILImage in a new Python process"
    import subprocess, sys
    from conftest import child_env
    from fastai.vision.all import Learner, Flatten
    from torch import nn
    dls = get_dls(32, bs=8, data=sample, workers=0, device='cpu')
    learn = Learner(dls, nn.Sequential(nn.AdaptiveAvgPool2d(1), Flatten(), nn.Linear(3, 10)))
    learn.export(tmp_path/'export.pkl')
    fn = sample/dls.valid_ds.items.path.iloc[0]
    r = subprocess.run([sys.executable, '-c', PREDICT, str(tmp_path/'export.pkl'), str(fn)], capture_output=True, text=True,
                       timeout=300, env=child_env())
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[-1] == '2'

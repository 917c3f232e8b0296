"""The reader study: export (deterministic, blind, key out of reach), the server (paths, answers, resume), the
analysis (against scipy and a hand-computed example), the three commands on a finished cdcgan smoke run, and
the page itself in headless Chromium."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image
from scipy import stats

from cxrjax.data.dataset import Split
from cxrjax.errors import UserError
from cxrjax.reader_study import analysis, export, server, study

from conftest import ROOT

CLASSES = ('normal', 'pneumonia')


def make_pools(real=(30, 30), synthetic=(30, 30), size=16, channels=1, seed=0) -> export.Pools:
  """Pools of random images, as `export.load_run` returns them, without a run."""
  rng = np.random.default_rng(seed)

  def split(counts, group, name):
    labels = np.concatenate([np.full(n, c, np.int32) for c, n in enumerate(counts)])
    images = rng.integers(0, 256, (len(labels), size, size, channels), dtype=np.uint8)
    return Split(images, labels, np.full(len(labels), group), np.array([f'{name}[{i}]' for i in range(len(labels))]))

  info = dict(
    run='(arrays)',
    generator=dict(tag='fake', generator='fake'),
    generator_quality={},
    real=dict(data='random arrays', phantom=False, splits=['test'], available=list(real), excluded={}),
    synthetic_available=list(synthetic),
  )
  return export.Pools(split(real, 'test', 'test'), split(synthetic, 'synthetic', 'synthetic.npz'), CLASSES, info)


def files(folder) -> dict[str, bytes]:
  out = {}
  for root, _, names in os.walk(folder):
    for n in names:
      p = os.path.join(root, n)
      out[os.path.relpath(p, folder)] = open(p, 'rb').read()
  return out


def read_json(path):
  with open(path) as f:
    return json.load(f)


# ---------------------------------------------------------------------------------------------------------------------
# Export


def test_export_is_deterministic_per_seed(tmp_path):
  pools = make_pools()
  a = export.export_study(str(tmp_path / 'a'), pools, n=20, seed=7)
  b = export.export_study(str(tmp_path / 'b'), pools, n=20, seed=7)
  c = export.export_study(str(tmp_path / 'c'), pools, n=20, seed=8)
  assert files(tmp_path / 'a') == files(tmp_path / 'b')  # every byte: images, names, manifest, key
  assert a == b
  assert set(a['images']) != set(c['images'])
  key_a, key_c = (read_json(tmp_path / s / study.DEFAULT_KEY) for s in 'ac')
  assert sorted(v['origin'] for v in key_a['items'].values()) != sorted(v['origin'] for v in key_c['items'].values())
  # The same seed on another generator's images: another study id, other names; answers do not carry over.
  other = make_pools()
  other.info['generator'] = dict(tag='another')
  d = export.export_study(str(tmp_path / 'd'), other, n=20, seed=7)
  assert d['study_id'] != a['study_id'] and not set(d['images']) & set(a['images'])
  record = study.new_reader(a, 'r1')
  study.save_reader(str(tmp_path / 'r1.json'), record)
  with pytest.raises(UserError, match='not of this study'):
    study.load_reader(str(tmp_path / 'r1.json'), d)


def test_export_mix_names_and_key(tmp_path):
  pools = make_pools(real=(40, 40), synthetic=(40, 40))
  m = export.export_study(str(tmp_path / 's'), pools, n=30, seed=1, synthetic_share=0.5, class_weights='1,2')
  key = read_json(tmp_path / 's' / study.DEFAULT_KEY)
  # Class balance by weight (1:2 of 30), the same synthetic share within each class.
  assert m['counts'] == {'normal': {'real': 5, 'synthetic': 5}, 'pneumonia': {'real': 10, 'synthetic': 10}}
  assert m['ask_class'] and m['classes'] == list(CLASSES)
  # Anonymous names: random tokens, listed in name order, unrelated to the answers.
  assert all(re.fullmatch(r'[0-9a-f]{16}', t) for t in m['images']) and m['images'] == sorted(m['images'])
  truths = [key['items'][t]['truth'] for t in m['images']]
  assert truths != sorted(truths) and truths != sorted(truths, reverse=True)
  # The key: outside images/, its sha256 in the manifest; the manifest itself says nothing per image.
  assert m['key']['path'] == study.DEFAULT_KEY
  images_dir = str(tmp_path / 's' / 'images')
  assert os.path.commonpath([str(tmp_path / 's' / study.DEFAULT_KEY), images_dir]) != images_dir
  assert all(n.endswith('.png') for n in os.listdir(images_dir))
  assert m['key']['sha256'] == hashlib.sha256((tmp_path / 's' / study.DEFAULT_KEY).read_bytes()).hexdigest()
  assert sorted(os.listdir(tmp_path / 's' / 'images')) == [f'{t}.png' for t in m['images']]
  assert 'synthetic.npz[' not in (tmp_path / 's' / study.MANIFEST).read_text()
  # Each image is the pixels of the row the key names.
  for token, item in key['items'].items():
    pool = pools.synthetic if item['truth'] == 'synthetic' else pools.real
    row = int(item['origin'].split('[')[1].rstrip(']'))
    png = np.asarray(Image.open(tmp_path / 's' / 'images' / f'{token}.png'))
    np.testing.assert_array_equal(png, pool.images[row][..., 0])
    assert CLASSES[pool.labels[row]] == item['class']


@pytest.mark.parametrize('channels', [1, 3])
def test_images_are_written_the_same_way(tmp_path, channels):
  """Real and synthetic files differ in their pixels only: format, size, mode, dtype, chunk layout, times."""
  pools = make_pools(channels=channels)
  # Make the two pools as different as an encoder could show: flat synthetic images, noisy real ones.
  pools.synthetic.images[:] = 128
  export.export_study(str(tmp_path / 's'), pools, n=24, seed=0)
  key = read_json(tmp_path / 's' / study.DEFAULT_KEY)
  layouts, headers, props, mtimes = set(), set(), set(), set()
  for token in key['items']:
    path = tmp_path / 's' / 'images' / f'{token}.png'
    data = path.read_bytes()
    chunks = study.png_chunks(data)
    layouts.add(tuple(k for k, _ in chunks if k != b'IDAT'))
    headers.add(chunks[0][1])
    img = Image.open(io.BytesIO(data))
    props.add((img.format, img.size, img.mode, np.asarray(img).dtype.str, tuple(sorted(img.info))))
    mtimes.add(os.stat(path).st_mtime_ns)
  assert layouts == {(b'IHDR', b'IEND')}, 'no ancillary chunk (text, time, gamma, physical size)'
  assert len(headers) == 1 and len(mtimes) == 1
  mode = 'L' if channels == 1 else 'RGB'
  assert props == {('PNG', (16, 16), mode, '|u1', ())}
  truths = {v['truth'] for v in key['items'].values()}
  assert truths == {'real', 'synthetic'}


def test_export_refusals(tmp_path):
  pools = make_pools(real=(3, 30), synthetic=(30, 30))
  with pytest.raises(UserError, match='class normal: 5 real images needed'):
    export.export_study(str(tmp_path / 'a'), pools, n=20, seed=0)
  assert not os.path.exists(tmp_path / 'a') and not os.listdir(tmp_path)  # nothing half-written
  with pytest.raises(UserError, match='unknown class'):
    export.export_study(str(tmp_path / 'a'), pools, n=4, classes='effusion')
  with pytest.raises(UserError, match='inside .*images'):
    export.export_study(
      str(tmp_path / 'a'), pools, n=4, classes='pneumonia', key_path=str(tmp_path / 'a/images/k.json')
    )
  with pytest.raises(UserError, match='synthetic-share'):
    export.export_study(str(tmp_path / 'a'), pools, n=4, synthetic_share=1.5)
  (tmp_path / 'full').mkdir()
  (tmp_path / 'full' / 'x').write_text('')
  with pytest.raises(UserError, match='not empty'):
    export.export_study(str(tmp_path / 'full'), pools, n=4, classes='pneumonia')
  # A key outside the study folder: the manifest records where it went.
  m = export.export_study(str(tmp_path / 'b'), pools, n=4, classes='pneumonia', key_path=str(tmp_path / 'keys/k.json'))
  assert m['key']['path'] == str(tmp_path / 'keys/k.json') and not (tmp_path / 'b' / 'key').exists()
  assert not m['ask_class']


# ---------------------------------------------------------------------------------------------------------------------
# Server


@contextlib.contextmanager
def serving(study_dir, reader='r1'):
  srv = server.StudyServer(str(study_dir), reader, '127.0.0.1', 0)
  thread = threading.Thread(target=srv.serve_forever, daemon=True)
  thread.start()
  try:
    yield srv
  finally:
    srv.shutdown()
    srv.server_close()
    thread.join(10)


def fetch(srv, method, path, body=None, headers=None):
  """A raw request: the path goes out exactly as given (no client-side normalisation)."""
  port = srv.server_address[1]
  conn = http.client.HTTPConnection('127.0.0.1', port, timeout=10)
  conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
  headers = {'Host': f'127.0.0.1:{port}', **(headers or {})}
  if body is not None:
    body = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers.setdefault('Content-Type', 'application/json')
    headers['Content-Length'] = str(len(body))
  for k, v in headers.items():
    conn.putheader(k, v)
  conn.endheaders(body)
  r = conn.getresponse()
  out = (r.status, r.read(), dict(r.getheaders()))
  conn.close()
  return out


@pytest.fixture
def small_study(tmp_path):
  export.export_study(str(tmp_path / 'study'), make_pools(), n=12, seed=0)
  return tmp_path / 'study'


def test_server_serves_images_and_nothing_else(small_study):
  manifest = study.load_manifest(str(small_study))
  key_path = small_study / study.DEFAULT_KEY
  key_bytes = key_path.read_bytes()
  token = manifest['images'][0]
  # A symlink in images/ under a manifest name, pointing out of the folder: refused.
  os.replace(small_study / 'images' / f'{token}.png', small_study / 'moved.png')
  os.symlink(key_path, small_study / 'images' / f'{token}.png')
  # A file in images/ under a name the manifest does not list: refused.
  shutil.copy(key_path, small_study / 'images' / '0123456789abcdef.png')
  with serving(small_study) as srv:
    port = srv.server_address[1]
    ok = manifest['images'][1]
    status, body, headers = fetch(srv, 'GET', f'/images/{ok}.png')
    assert status == 200 and body == (small_study / 'images' / f'{ok}.png').read_bytes()
    assert headers['Content-Type'] == 'image/png' and 'Last-Modified' not in headers and 'ETag' not in headers
    status, body, headers = fetch(srv, 'GET', '/')
    assert status == 200 and b'<title>Reader study</title>' in body and 'Content-Security-Policy' in headers
    assert b'http://' not in body and b'https://' not in body  # no external assets
    attempts = [
      f'/images/{token}.png',  # the symlink to the key
      '/images/0123456789abcdef.png',
      '/images/../key/answer_key.json',
      '/images/%2e%2e/key/answer_key.json',
      '/images/%2E%2E%2Fkey%2Fanswer_key.json',
      '/images/..%2fkey%2fanswer_key.json',
      '/images/..%252fkey%252fanswer_key.json',
      '/images/%5c..%5ckey%5canswer_key.json',
      '/%2e%2e/%2e%2e/%2e%2e/etc/passwd',
      '/../study.json',
      '/key/answer_key.json',
      '/study.json',
      '/readers/r1.json',
      '/images/',
      '/images',
      '//etc/passwd',
      '/etc/passwd',
      '/' + str(key_path),
      '//' + str(key_path).lstrip('/'),
      '/images/' + str(key_path),
      f'/images/{ok}.png/../../key/answer_key.json',
      f'/images/{ok}.png%00',
      f'http://127.0.0.1:{port}/../key/answer_key.json',
      'key/answer_key.json',
    ]
    for path in attempts:
      status, body, _ = fetch(srv, 'GET', path)
      assert status == 404, (path, status)
      assert key_bytes[:200] not in body and b'"truth"' not in body, path
    # A page elsewhere reaching the server under another host name (DNS rebinding): refused.
    assert fetch(srv, 'GET', '/api/state', headers={'Host': f'attacker.example:{port}'})[0] == 403
    assert b'"truth"' not in fetch(srv, 'GET', '/api/state')[1]


def answer(token, call='real', realism=3, cls='normal', seconds=2.5):
  return dict(token=token, call=call, realism=realism, **{'class': cls}, seconds=seconds)


def test_answers_are_saved_as_given_and_the_reader_resumes(small_study):
  record_path = small_study / 'readers' / 'r1.json'
  with serving(small_study) as srv:
    order = json.loads(fetch(srv, 'GET', '/api/state')[1])['order']
    assert order == study.reader_order(study.load_manifest(str(small_study)), 'r1')
    for i, token in enumerate(order[:3]):
      status, body, _ = fetch(srv, 'POST', '/api/answer', answer(token, 'synthetic' if i % 2 else 'real', i + 1))
      assert status == 200, body
      saved = read_json(record_path)  # on disk before the reply
      assert len(saved['answers']) == i + 1 and saved['answers'][token]['realism'] == i + 1
    bad = [
      (answer(order[3], call='maybe'), 400),
      (answer(order[3], realism=6), 400),
      (answer(order[3], realism=True), 400),
      (answer(order[3], cls='effusion'), 400),
      (answer('0123456789abcdef'), 400),
      (answer(order[3], seconds=-1), 400),
    ]
    for payload, code in bad:
      assert fetch(srv, 'POST', '/api/answer', payload)[0] == code, payload
    assert fetch(srv, 'POST', '/api/answer', b'not json')[0] == 400
    assert fetch(srv, 'POST', '/api/answer', answer(order[3]), {'Content-Type': 'text/plain'})[0] == 415
    assert fetch(srv, 'POST', '/api/answer', b'x' * 5000)[0] == 413
    assert len(read_json(record_path)['answers']) == 3
    # One server per reader.
    with pytest.raises(UserError, match='already being served'):
      server.StudyServer(str(small_study), 'r1', '127.0.0.1', 0)
    # A revised answer replaces the first and counts the revision.
    assert fetch(srv, 'POST', '/api/answer', answer(order[0], realism=5))[0] == 200
    assert read_json(record_path)['answers'][order[0]]['revisions'] == 1
  with serving(small_study) as srv:
    state = json.loads(fetch(srv, 'GET', '/api/state')[1])
    assert state['next'] == 3 and set(state['answers']) == set(order[:3]) and state['order'] == order
  with pytest.raises(UserError, match='--reader'):
    server.StudyServer(str(small_study), '../evil', '127.0.0.1', 0)


# ---------------------------------------------------------------------------------------------------------------------
# Analysis


def test_fleiss_kappa_hand_computed():
  # 4 images, 3 readers, real/synthetic counts. Per image, the share of agreeing reader pairs:
  # (3,0) -> 1, (2,1) -> 1/3, (0,3) -> 1, (1,2) -> 1/3; mean 2/3. Category shares 6/12 and 6/12,
  # chance agreement 1/2. kappa = (2/3 - 1/2) / (1 - 1/2) = 1/3.
  assert analysis.fleiss_kappa([[3, 0], [2, 1], [0, 3], [1, 2]]) == pytest.approx(1 / 3)
  # 3 categories, 2 images, 4 readers: (4,0,0) -> 1, (0,2,2) -> (8-4)/12 = 1/3; mean 2/3.
  # Shares 4/8, 2/8, 2/8: chance 1/4 + 1/16 + 1/16 = 3/8. kappa = (2/3 - 3/8) / (5/8) = 7/15.
  assert analysis.fleiss_kappa([[4, 0, 0], [0, 2, 2]]) == pytest.approx(7 / 15)
  assert analysis.fleiss_kappa([[2, 0], [2, 0]]) != analysis.fleiss_kappa([[2, 0], [2, 0]])  # NaN: one category
  with pytest.raises(ValueError):
    analysis.fleiss_kappa([[2, 0], [1, 0]])


def test_always_real_reader_gets_half_on_a_balanced_study(tmp_path):
  s = tmp_path / 'study'
  export.export_study(str(s), make_pools(), n=40, seed=2, classes='pneumonia')
  analysis.simulate_reader(str(s), 'always_real', always='real')
  analysis.simulate_reader(str(s), 'informed', accuracy=0.8, seed=5)
  result = analysis.analyze(str(s))
  r = result['readers']['always_real']['overall']
  assert r['accuracy']['rate'] == 0.5 and r['accuracy']['k'] == 20 and r['accuracy']['n'] == 40
  assert (r['sensitivity'], r['specificity'], r['balanced_accuracy']) == (0.0, 1.0, 0.5)
  ref = stats.binomtest(20, 40, 0.5)
  assert r['accuracy']['p_value'] == pytest.approx(ref.pvalue)
  ci = ref.proportion_ci(0.95, method='exact')
  assert r['accuracy']['ci'] == pytest.approx([ci.low, ci.high])
  for name in ('informed', None):
    acc = (result['readers'][name] if name else result['pooled'])['overall']['accuracy']
    assert acc['p_value'] == pytest.approx(stats.binomtest(acc['k'], acc['n'], 0.5).pvalue)
  assert result['simulated'] == ['always_real', 'informed']
  report = (s / 'analysis' / 'report.md').read_text()
  assert report.startswith('# Reader study report (SIMULATED readers)') and '**SIMULATED.**' in report


def hand_study(tmp_path):
  """8 images (2 classes x 2 real + 2 synthetic) and two readers whose answers are set by hand."""
  s = tmp_path / 'study'
  export.export_study(str(s), make_pools(), n=8, seed=0)
  manifest = study.load_manifest(str(s))
  key = read_json(s / study.DEFAULT_KEY)
  by = {}
  for token, item in sorted(key['items'].items(), key=lambda kv: kv[1]['origin']):
    by.setdefault((item['class'], item['truth']), []).append(token)
  r1, r2 = by[('normal', 'real')]
  s1, s2 = by[('normal', 'synthetic')]
  r3, r4 = by[('pneumonia', 'real')]
  s3, s4 = by[('pneumonia', 'synthetic')]
  answers = {
    'x': {r1: ('real', 5, 'normal'), r2: ('real', 4, 'normal'), s1: ('real', 4, 'normal'),
          s2: ('synthetic', 2, 'pneumonia'), r3: ('synthetic', 3, 'pneumonia'), r4: ('real', 5, 'pneumonia'),
          s3: ('synthetic', 1, 'pneumonia'), s4: ('synthetic', 2, 'pneumonia')},
    'y': {r1: ('synthetic', 2, 'normal'), r2: ('real', 4, 'normal'), s1: ('synthetic', 2, 'normal'),
          s2: ('real', 3, 'normal'), r3: ('real', 4, 'pneumonia'), r4: ('real', 4, 'normal'),
          s3: ('real', 5, 'pneumonia'), s4: ('synthetic', 1, 'pneumonia')},
  }  # fmt: skip
  for name, given in answers.items():
    record = study.new_reader(manifest, name)
    for token, (call, realism, cls) in given.items():
      study.record_answer(record, manifest, token, dict(call=call, realism=realism, **{'class': cls}))
    study.save_reader(study.reader_path(str(s), name), record)
  return s


def test_analysis_reproduces_a_hand_computed_example(tmp_path):
  result = analysis.analyze(str(hand_study(tmp_path)))
  x, y, pooled = result['readers']['x'], result['readers']['y'], result['pooled']
  # x right on 6 of 8. Two-sided exact binomial at 0.5: 2 (C(8,6) + C(8,7) + C(8,8)) / 2^8 = 74/256.
  assert x['overall']['accuracy']['k'] == 6 and x['overall']['accuracy']['p_value'] == pytest.approx(74 / 256)
  assert (x['overall']['sensitivity'], x['overall']['specificity']) == (0.75, 0.75)
  # y right on 5 of 8: 2 (56 + 28 + 8 + 1) / 256 = 186/256.
  assert y['overall']['accuracy']['k'] == 5 and y['overall']['accuracy']['p_value'] == pytest.approx(186 / 256)
  # Pooled 11 of 16: 2 (C(16,11) + ... + C(16,16)) / 2^16 = 2 * 6885 / 65536.
  assert pooled['overall']['accuracy']['k'] == 11
  assert pooled['overall']['accuracy']['p_value'] == pytest.approx(2 * 6885 / 65536)
  # Realism AUC = P(real scored above synthetic) + P(tie) / 2, counted over pairs.
  # x: real 5,4,3,5 against synthetic 4,2,1,2: 4 + 3.5 + 3 + 4 = 14.5 of 16.
  assert x['overall']['realism_auc']['auc'] == pytest.approx(14.5 / 16)
  # y: real 2,4,4,4 against synthetic 2,3,5,1: 1.5 + 3 + 3 + 3 = 10.5 of 16.
  assert y['overall']['realism_auc']['auc'] == pytest.approx(10.5 / 16)
  # Pooled: real 5,4,3,5,2,4,4,4 against synthetic 4,2,1,2,2,3,5,1: 50 of 64.
  assert pooled['overall']['realism_auc']['auc'] == pytest.approx(50 / 64)
  lo, hi = pooled['overall']['realism_auc']['ci']
  assert lo <= 50 / 64 <= hi
  # Per class, pooled: normal 3 (x) + 2 (y) of 8; pneumonia 3 + 3 of 8.
  assert pooled['per_class']['normal']['accuracy']['k'] == 5 and pooled['per_class']['pneumonia']['accuracy']['k'] == 6
  # Class named: synthetic images as generated x 3/4, y 4/4; real images x 4/4, y 3/4; chance 1/2.
  assert x['naming']['synthetic']['k'] == 3 and y['naming']['synthetic']['k'] == 4
  assert pooled['naming']['synthetic']['k'] == 7 and pooled['naming']['real']['k'] == 7
  assert pooled['naming']['real']['p_value'] == pytest.approx(stats.binomtest(7, 8, 0.5).pvalue)
  # Fleiss' kappa on the call: 3 of 8 images agreed, P = 3/8; shares 9/16 real, 7/16 synthetic,
  # Pe = (81 + 49) / 256; kappa = (3/8 - 130/256) / (1 - 130/256) = -17/63.
  assert result['agreement']['kappa_call'] == pytest.approx(-17 / 63)
  # On the class: 6 of 8 agreed, P = 3/4; shares 1/2, 1/2, Pe = 1/2; kappa = 1/2.
  assert result['agreement']['kappa_class'] == pytest.approx(0.5)
  # Mistaken: s1, s2, s3 were each called real by one reader (s3 at realism 5 first); r1, r3 called synthetic once.
  assert [i['called_real'] for i in result['mistaken']['synthetic_called_real']] == [1, 1, 1]
  assert result['mistaken']['synthetic_called_real'][0]['realism_mean'] == 3.0  # s3: (1 + 5) / 2
  assert len(result['mistaken']['real_called_synthetic']) == 2
  report = (tmp_path / 'study' / 'analysis' / 'report.md').read_text()
  assert 'SIMULATED' not in report and '0.750 [' in report and '-0.270' in report
  for fig in ('accuracy_realism.png', 'mistaken.png'):
    assert (tmp_path / 'study' / 'analysis' / fig).stat().st_size > 1000


def test_analysis_checks_the_key(tmp_path):
  s = hand_study(tmp_path)
  key = s / study.DEFAULT_KEY
  moved = tmp_path / 'elsewhere.json'
  os.replace(key, moved)
  with pytest.raises(UserError, match='no such file'):
    analysis.analyze(str(s))
  assert analysis.analyze(str(s), key_path=str(moved))['key']['verified']
  data = read_json(moved)
  first = sorted(data['items'])[0]
  data['items'][first]['truth'] = 'real' if data['items'][first]['truth'] == 'synthetic' else 'synthetic'
  moved.write_text(json.dumps(data, indent=2) + '\n')
  with pytest.raises(UserError, match='sha256'):
    analysis.analyze(str(s), key_path=str(moved))


# ---------------------------------------------------------------------------------------------------------------------
# The commands, end to end


def cli(*args, timeout=300):
  return subprocess.run(
    [sys.executable, '-m', 'cxrjax.reader_study', *map(str, args)],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def start_server(study_dir, reader, port=0) -> tuple[subprocess.Popen, str]:
  proc = subprocess.Popen(
    [sys.executable, '-m', 'cxrjax.reader_study', 'serve', str(study_dir), '--reader', reader, '--port', str(port)],
    cwd=ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  line = proc.stdout.readline()
  m = re.search(r'http://127\.0\.0\.1:\d+/', line)
  if not m:
    proc.kill()
    pytest.fail(f'serve did not start: {line!r} {proc.stderr.read()[-2000:]}')
  return proc, m.group(0)


def post(url, payload):
  req = urllib.request.Request(
    url + 'api/answer', json.dumps(payload).encode(), {'Content-Type': 'application/json'}, method='POST'
  )
  with urllib.request.urlopen(req, timeout=10) as r:
    return json.loads(r.read())


@pytest.mark.e2e
def test_three_commands_on_a_finished_cdcgan_smoke_run(cdcgan_smoke_run, npz_path, tmp_path):
  assert cdcgan_smoke_run.returncode == 0, cdcgan_smoke_run.stderr
  run_dir, s = cdcgan_smoke_run.workdir, tmp_path / 'study'
  r = cli('export', '--run', run_dir, '--n', 100, '--out', s, '--seed', 3)
  assert r.returncode == 0, r.stderr
  assert 'pneumonia: 50 real + 50 synthetic' in r.stdout
  manifest = study.load_manifest(str(s))
  key = read_json(s / study.DEFAULT_KEY)
  assert manifest['command'].startswith('python -m cxrjax.reader_study export --run')
  assert not manifest['ask_class']  # the smoke run's synthetic set is pneumonia only
  # Real images are held-out test images, pixel for pixel, and none of them is a training image.
  with np.load(npz_path) as z:
    test_images, train_images = z['test_images'], z['train_images']
  train = {img.tobytes() for img in train_images}
  with np.load(run_dir / 'synthetic.npz') as z:
    syn = z['images']
  for token, item in key['items'].items():
    png = np.asarray(Image.open(s / 'images' / f'{token}.png'))
    row = int(item['origin'].split('[')[1].rstrip(']'))
    if item['truth'] == 'real':
      assert item['split'] == 'test' and item['origin'].startswith('test[')
      np.testing.assert_array_equal(png, test_images[row])
      assert png.tobytes() not in train
    else:
      np.testing.assert_array_equal(png, syn[row][..., 0])
  # Nothing is written where a study exists.
  r = cli('export', '--run', run_dir, '--n', 10, '--out', s)
  assert r.returncode == 2 and r.stderr.strip().count('\n') == 0 and 'not empty' in r.stderr
  assert cli('export', '--run', tmp_path / 'nope', '--out', tmp_path / 'x').returncode == 2
  assert not (tmp_path / 'x').exists()

  proc, url = start_server(s, 'reader1')
  try:
    order = json.loads(urllib.request.urlopen(url + 'api/state', timeout=10).read())['order']
    for i, token in enumerate(order[:5]):
      assert post(url, answer(token, 'real' if i % 2 else 'synthetic', 3 + i % 3, None))['answered'] == i + 1
  finally:
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
  assert proc.returncode == 0, err
  assert 'reader reader1: 5/100 answered' in out
  assert cli('simulate', s, '--reader', 'sim', '--accuracy', 0.7).returncode == 0

  r = cli('analyze', s)
  assert r.returncode == 0, r.stderr
  assert '2 reader(s) [SIMULATED: sim]' in r.stdout
  result = read_json(s / 'analysis' / 'analysis.json')
  assert result['readers']['reader1']['answered'] == 5 and result['agreement']['items'] == 5
  report = (s / 'analysis' / 'report.md').read_text()
  assert 'incomplete: 5/100' in report and 'cdcgan' in report and 'mistaken.png' in report
  # A key that is not this study's: refused, one line, exit 2.
  other = tmp_path / 'other.json'
  other.write_text('{}')
  r = cli('analyze', s, '--key', other)
  assert r.returncode == 2 and 'sha256' in r.stderr and r.stderr.strip().count('\n') == 0


def chrome():
  """A headless Chromium WebDriver, from Debian's chromium and chromium-driver packages."""
  missing = [p for p in ('chromium', 'chromedriver') if shutil.which(p) is None]
  if missing:
    pytest.fail(
      f'this test drives the page in headless Chromium; {" and ".join(missing)} not found:'
      ' install them with `apt-get install -y chromium chromium-driver` (Debian)'
    )
  try:
    from selenium import webdriver  # noqa: PLC0415 - this test only
    from selenium.webdriver.chrome.service import Service  # noqa: PLC0415
  except ImportError:
    pytest.fail('selenium is not installed: `pip install -c constraints.txt -e ".[test]"` (./dev test does)')
  options = webdriver.ChromeOptions()
  options.binary_location = shutil.which('chromium')
  for arg in ('--headless=new', '--no-sandbox', '--disable-dev-shm-usage', '--window-size=1100,760'):
    options.add_argument(arg)
  return webdriver.Chrome(options=options, service=Service(shutil.which('chromedriver')))


def wait_for(condition, what, timeout=20.0):
  end = time.monotonic() + timeout
  while time.monotonic() < end:
    value = condition()
    if value:
      return value
    time.sleep(0.05)
  pytest.fail(f'timed out waiting for {what}')


@pytest.mark.e2e
def test_page_in_headless_chromium_keeps_answers_across_a_server_kill(tmp_path):
  s = tmp_path / 'study'
  export.export_study(str(s), make_pools(), n=10, seed=4)  # two classes: the class question is asked
  record_path = s / 'readers' / 'dr_a.json'
  driver = chrome()
  proc, url = start_server(s, 'dr_a')
  port = int(url.rsplit(':', 1)[1].strip('/'))
  try:
    from selenium.webdriver.common.keys import Keys  # noqa: PLC0415

    def body():
      return driver.find_element('tag name', 'body')

    def shown():
      return driver.find_element('id', 'image').get_attribute('src').rsplit('/', 1)[1].removesuffix('.png')

    driver.get(url)
    wait_for(lambda: body().get_attribute('data-ready') == '1', 'the page')
    assert driver.find_element('id', 'intro').is_displayed()
    body().send_keys(Keys.ENTER)  # past the instructions
    order = read_json(record_path)['order']
    given = [('r', '4', 'a'), ('s', '2', 'b'), ('r', '5', 'b')]
    for i, (call, realism, cls) in enumerate(given):
      assert shown() == order[i] and driver.find_element('id', 'position').text == f'Image {i + 1} of 10'
      for key in (call, realism, cls):
        body().send_keys(key)
      body().send_keys(Keys.ENTER)
      wait_for(lambda i=i: body().get_attribute('data-answered') == str(i + 1), f'answer {i + 1} saved')
    saved = read_json(record_path)['answers']
    calls = {'r': 'real', 's': 'synthetic'}
    assert [(saved[t]['call'], saved[t]['realism'], saved[t]['class']) for t in order[:3]] == [
      (calls[c], int(r), CLASSES['ab'.index(k)]) for c, r, k in given
    ]
    assert driver.find_element('id', 'answered').text == '3 of 10 answered'

    # The server dies mid-study: the answer being given stays on the page, marked not saved.
    proc.kill()
    proc.wait(10)
    for key in ('s', '1', 'a', Keys.ENTER):
      body().send_keys(key)
    wait_for(lambda: 'NOT SAVED' in driver.find_element('id', 'status').text, 'the failed save to show')
    assert len(read_json(record_path)['answers']) == 3

    # Restarted on the same port, Enter saves it; a reload resumes at the next image.
    proc, _ = start_server(s, 'dr_a', port)
    body().send_keys(Keys.ENTER)
    wait_for(lambda: body().get_attribute('data-answered') == '4', 'the retried save')
    driver.get(url)
    wait_for(lambda: body().get_attribute('data-ready') == '1', 'the reloaded page')
    assert not driver.find_element('id', 'intro').is_displayed()
    assert body().get_attribute('data-index') == '4' and shown() == order[4]
    assert driver.find_element('id', 'answered').text == '4 of 10 answered'
    assert set(read_json(record_path)['answers']) == set(order[:4])
    # Back to an earlier image shows the answer given there.
    body().send_keys(Keys.ARROW_LEFT)
    assert shown() == order[3]
    assert 'selected' in driver.find_element('css selector', '#calls button[data-call="synthetic"]').get_attribute(
      'class'
    )
  finally:
    driver.quit()
    proc.kill()
    proc.wait(10)

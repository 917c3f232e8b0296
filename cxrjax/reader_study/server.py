"""The reader's page: a local web server (standard library only) over one study folder.

It answers a fixed set of routes and nothing else:

  GET  /                   the page (page/index.html, app.js, app.css: no external assets, works offline)
  GET  /api/state          the reader's order, answers so far and where to resume
  POST /api/answer         one answer, saved to readers/<name>.json atomically before the reply
  GET  /images/<token>.png an image named in the manifest, read from images/ only

There is no directory listing and no path mapping: an image is served only when its
name is a token of the manifest and the file it resolves to is a regular file inside
`images/` (a symlink pointing out is refused), so `..`, encoded dots, absolute paths and
the answer key cannot be reached. Responses carry no Last-Modified or ETag (file times
say nothing about an image) and are not cached. Bound to loopback, the server also
refuses requests whose Host header is not loopback (a web page elsewhere cannot reach
it through a rebound DNS name), and answers only JSON POSTs (a cross-site form cannot
post one without a preflight, which is never granted).
"""

from __future__ import annotations

import errno
import fcntl
import http.server
import json
import os
import socket
import stat
import threading
import urllib.parse
from typing import Any

from cxrjax.errors import UserError
from cxrjax.reader_study import study

PAGE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'page')
ASSETS = {
  '/': ('index.html', 'text/html; charset=utf-8'),
  '/index.html': ('index.html', 'text/html; charset=utf-8'),
  '/app.js': ('app.js', 'text/javascript; charset=utf-8'),
  '/app.css': ('app.css', 'text/css; charset=utf-8'),
}
CSP = (
  "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self';"
  " base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
MAX_BODY = 4096
LOOPBACK = ('127.0.0.1', 'localhost', '::1')


class StudyServer(http.server.ThreadingHTTPServer):
  """One reader, one study. Holds the reader's record in memory and writes it through on every answer."""

  daemon_threads = True

  def __init__(self, study_dir: str, reader: str, host: str = '127.0.0.1', port: int = 8765):
    self.study_dir = os.path.abspath(study_dir)
    self.manifest = study.load_manifest(self.study_dir)
    self.reader = study.check_reader_name(reader)
    self.images_dir = os.path.realpath(study.study_path(self.study_dir, study.IMAGES))
    self.tokens = frozenset(self.manifest['images'])
    self.assets = {}
    for route, (name, ctype) in ASSETS.items():
      with open(os.path.join(PAGE_DIR, name), 'rb') as f:
        self.assets[route] = (f.read(), ctype)
    self.record_path = study.reader_path(self.study_dir, reader)
    os.makedirs(os.path.dirname(self.record_path), exist_ok=True)
    self._lock_fd = _lock_reader(self.record_path, reader)
    if os.path.isfile(self.record_path):
      self.record = study.load_reader(self.record_path, self.manifest)
    else:
      self.record = study.new_reader(self.manifest, reader)
      study.save_reader(self.record_path, self.record)
    self.lock = threading.Lock()
    self.loopback = host in LOOPBACK
    if ':' in host:
      self.address_family = socket.AF_INET6
    try:
      super().__init__((host, port), Handler)
    except OSError as e:
      self._unlock()
      if e.errno == errno.EADDRINUSE:
        raise UserError(f'--port {port}: already in use (choose another, or --port 0 for any free port)') from e
      raise UserError(f'--host {host} --port {port}: cannot listen ({e.strerror or e})') from e

  @property
  def url(self) -> str:
    host, port = self.server_address[:2]
    return f'http://{"[" + host + "]" if ":" in host else host}:{port}/'

  def allowed_hosts(self) -> set[str]:
    port = self.server_address[1]
    return {f'127.0.0.1:{port}', f'localhost:{port}', f'[::1]:{port}'}

  def state(self) -> dict[str, Any]:
    r = self.record
    return dict(
      reader=self.reader,
      n=len(r['order']),
      ask_class=self.manifest['ask_class'],
      classes=self.manifest['classes'],
      realism_labels={str(k): v for k, v in study.REALISM_LABELS.items()},
      order=r['order'],
      answers={
        t: {'call': a['call'], 'realism': a['realism'], 'class': a.get('class')} for t, a in r['answers'].items()
      },
      next=study.next_index(r),
    )

  def answer(self, payload: Any) -> dict[str, Any]:
    if not isinstance(payload, dict):
      raise UserError('expected a JSON object')
    token = payload.get('token')
    seconds = payload.get('seconds')
    if seconds is not None and (not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or seconds < 0):
      raise UserError(f'seconds {seconds!r}: expected a non-negative number')
    answer = {k: payload.get(k) for k in ('call', 'realism', 'class')}
    with self.lock:
      record = json.loads(json.dumps(self.record))  # the saved copy changes only once the file is written
      study.record_answer(record, self.manifest, token, answer, seconds)
      study.save_reader(self.record_path, record)
      self.record = record
      return dict(saved=token, answered=len(record['answers']), next=study.next_index(record))

  def image_path(self, token: str) -> str | None:
    """The file of image `token`, or None: a manifest token whose file is a regular file inside images/."""
    if not study.TOKEN_RE.match(token) or token not in self.tokens:
      return None
    path = os.path.join(self.images_dir, f'{token}.png')
    try:
      st = os.lstat(path)
    except OSError:
      return None
    if not stat.S_ISREG(st.st_mode) or os.path.dirname(os.path.realpath(path)) != self.images_dir:
      return None
    return path

  def server_close(self) -> None:
    super().server_close()
    self._unlock()

  def _unlock(self) -> None:
    if self._lock_fd is not None:
      fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
      os.close(self._lock_fd)
      self._lock_fd = None


def _lock_reader(record_path: str, reader: str) -> int:
  """An exclusive flock per reader (released by the kernel if the server is killed): one server per reader."""
  path = os.path.join(os.path.dirname(record_path), f'.{reader}.lock')
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError as e:
    os.close(fd)
    raise UserError(f'reader {reader}: already being served by another process (lock {path})') from e
  return fd


class Handler(http.server.BaseHTTPRequestHandler):
  server: StudyServer
  server_version = 'cxrjax-reader-study'
  sys_version = ''

  def version_string(self) -> str:
    return self.server_version

  def log_message(self, format, *args):
    pass  # no request log: the terminal shows the URL and the reader's progress only

  def _send(self, code: int, body: bytes, ctype: str, extra: dict[str, str] | None = None) -> None:
    self.send_response(code)
    self.send_header('Content-Type', ctype)
    self.send_header('Content-Length', str(len(body)))
    self.send_header('Cache-Control', 'no-store')
    self.send_header('X-Content-Type-Options', 'nosniff')
    self.send_header('Referrer-Policy', 'no-referrer')
    for k, v in (extra or {}).items():
      self.send_header(k, v)
    self.end_headers()
    if self.command != 'HEAD':
      self.wfile.write(body)

  def _json(self, code: int, obj: Any) -> None:
    self._send(code, json.dumps(obj).encode(), 'application/json; charset=utf-8')

  def _error(self, code: int, message: str) -> None:
    self._json(code, {'error': message})

  def _host_ok(self) -> bool:
    return not self.server.loopback or (self.headers.get('Host') or '').lower() in self.server.allowed_hosts()

  def _route(self) -> str | None:
    """The request's path, percent-decoded, or None unless it is a plain absolute path without dot segments."""
    raw = self.path
    if not raw.startswith('/') or raw.startswith('//'):
      return None
    try:
      path = urllib.parse.unquote(urllib.parse.urlsplit(raw).path, errors='strict')
    except UnicodeDecodeError:
      return None
    if '\\' in path or '\x00' in path or any(seg in ('.', '..') for seg in path.split('/')):
      return None
    return path

  def do_GET(self) -> None:
    if not self._host_ok():
      return self._error(403, 'forbidden host')
    path = self._route()
    if path is None:
      return self._error(404, 'not found')
    if path == '/favicon.ico':
      return self._send(204, b'', 'image/x-icon')
    if path in self.server.assets:
      body, ctype = self.server.assets[path]
      extra = {'Content-Security-Policy': CSP} if ctype.startswith('text/html') else {}
      return self._send(200, body, ctype, extra)
    if path == '/api/state':
      with self.server.lock:
        return self._json(200, self.server.state())
    if path.startswith('/images/') and path.endswith('.png') and path.count('/') == 2:
      file = self.server.image_path(path[len('/images/') : -len('.png')])
      if file is not None:
        with open(file, 'rb') as f:
          return self._send(200, f.read(), 'image/png')
    return self._error(404, 'not found')

  do_HEAD = do_GET

  def do_POST(self) -> None:
    if not self._host_ok():
      return self._error(403, 'forbidden host')
    if self._route() != '/api/answer':
      return self._error(404, 'not found')
    if (self.headers.get('Content-Type') or '').split(';')[0].strip().lower() != 'application/json':
      return self._error(415, 'expected Content-Type: application/json')
    try:
      length = int(self.headers.get('Content-Length') or '')
    except ValueError:
      return self._error(411, 'Content-Length required')
    if not 0 < length <= MAX_BODY:
      return self._error(413, f'body of {length} bytes; at most {MAX_BODY}')
    try:
      payload = json.loads(self.rfile.read(length))
    except (ValueError, UnicodeDecodeError):
      return self._error(400, 'not JSON')
    try:
      result = self.server.answer(payload)
    except UserError as e:
      return self._error(400, str(e))
    except OSError as e:  # disk full, folder gone: the answer is not saved, and the page says so
      return self._error(500, f'could not save the answer: {e}')
    return self._json(200, result)


def progress_line(server: StudyServer) -> str:
  with server.lock:
    done, n = len(server.record['answers']), len(server.record['order'])
  return f'reader {server.reader}: {done}/{n} answered, saved in {server.record_path}'

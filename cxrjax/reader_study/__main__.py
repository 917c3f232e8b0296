r"""A blinded reader study of synthetic images (the visual Turing test): export, serve, analyze.

  python -m cxrjax.reader_study export --run runs/cdcgan --n 100 --out studies/s1
  python -m cxrjax.reader_study serve studies/s1 --reader alice      # then open the URL it prints
  python -m cxrjax.reader_study analyze studies/s1                   # -> studies/s1/analysis/report.md

`export` mixes held-out real images of the run's data with images from its
synthetic.npz (seeded; class balance and synthetic share by option) into
STUDY/images/ under random names, and writes the answer key to STUDY/key/ (or
--key PATH), outside what the server reads. `serve` shows one image at a time to
one reader on http://127.0.0.1:PORT/ and saves every answer to
STUDY/readers/NAME.json as it is given. `analyze` scores every reader against the
key (after checking the key's sha256). `simulate` writes a made-up reader's answers,
marked SIMULATED everywhere, to try the analysis before the real readers come.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys

from cxrjax.errors import UserError


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog='python -m cxrjax.reader_study', description=__doc__.split('\n\n')[0])
  sub = p.add_subparsers(dest='command', required=True)

  e = sub.add_parser('export', help='build a study folder from a finished generative run')
  e.add_argument('--run', required=True, help='the workdir of a finished generative run (synthetic.npz, metrics.json)')
  e.add_argument('--out', required=True, help='the study folder to create (must not exist, or be empty)')
  e.add_argument('--n', type=int, default=100, help='number of images (default 100)')
  e.add_argument('--seed', type=int, default=0, help="seed of the draw, the names and the readers' orders")
  e.add_argument('--synthetic-share', type=float, default=0.5, help='fraction of synthetic images in each class')
  e.add_argument(
    '--classes', default='', help='classes to show, by name or index (default: those the synthetic set has)'
  )
  e.add_argument('--class-weights', default='', help='relative number of images per class of --classes (default equal)')
  e.add_argument('--real-splits', default='test', help='held-out splits for the real images: test, val or val,test')
  e.add_argument('--key', default='', help='where to write the answer key (default STUDY/key/answer_key.json)')

  s = sub.add_parser('serve', help='show the study to one reader in the browser')
  s.add_argument('study')
  s.add_argument('--reader', required=True, help="the reader's name (letters, digits, _ - .): one answers file each")
  s.add_argument('--host', default='127.0.0.1', help='address to listen on (default 127.0.0.1: this machine only)')
  s.add_argument('--port', type=int, default=8765, help='port (default 8765; 0 = any free port)')

  a = sub.add_parser('analyze', help='score the readers against the answer key; write analysis/report.md')
  a.add_argument('study')
  a.add_argument('--key', default='', help='the answer key, if not where the manifest says')
  a.add_argument('--out', default='', help='output folder (default STUDY/analysis)')

  m = sub.add_parser('simulate', help='write a SIMULATED reader (for trying the analysis; needs the key)')
  m.add_argument('study')
  m.add_argument('--reader', required=True)
  m.add_argument('--accuracy', type=float, default=0.6, help='probability of a correct real/synthetic call')
  m.add_argument('--always', choices=['real', 'synthetic'], default=None, help='answer this for every image instead')
  m.add_argument('--answers', type=int, default=None, help='stop after this many images (default: all)')
  m.add_argument('--seed', type=int, default=0)
  m.add_argument('--key', default='')
  return p


def _export(args, argv) -> None:
  from cxrjax.reader_study import export  # noqa: PLC0415 - each command imports only what it needs

  splits = tuple(s.strip() for s in args.real_splits.split(',') if s.strip())
  pools = export.load_run(args.run, splits)
  manifest = export.export_study(
    args.out,
    pools,
    n=args.n,
    seed=args.seed,
    synthetic_share=args.synthetic_share,
    classes=args.classes,
    class_weights=args.class_weights,
    key_path=args.key or None,
    command='python -m cxrjax.reader_study ' + shlex.join(argv),
  )
  print(f'study written to {args.out}: {export.summary(manifest)}')
  print(f'answer key: {manifest["key"]["path"]} (sha256 {manifest["key"]["sha256"][:16]}...; never served)')
  print(f'next: python -m cxrjax.reader_study serve {shlex.quote(args.out)} --reader NAME')


def _serve(args) -> None:
  from cxrjax.reader_study import server as server_lib  # noqa: PLC0415

  server = server_lib.StudyServer(args.study, args.reader, args.host, args.port)
  # SIGTERM ends the server as Ctrl-C does (every answer is on disk already; this only prints the tally).
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
  print(f'reader study: open {server.url} (reader {args.reader}); Ctrl-C stops, answers are kept', flush=True)
  if server.record.get('simulated'):
    print(f'note: the answers file of {args.reader} is marked SIMULATED (made by `simulate`)', flush=True)
  if not server.loopback:
    print(f'note: listening on {args.host}: other machines on the network can reach this page', flush=True)
  print(server_lib.progress_line(server), flush=True)
  try:
    server.serve_forever()
  except (KeyboardInterrupt, SystemExit):
    pass
  finally:
    server.server_close()
    print('\n' + server_lib.progress_line(server), flush=True)


def _analyze(args) -> None:
  from cxrjax.reader_study import analysis  # noqa: PLC0415

  result = analysis.analyze(args.study, key_path=args.key or None, out_dir=args.out or None)
  print(analysis.summary_lines(result))


def _simulate(args) -> None:
  from cxrjax.reader_study import analysis  # noqa: PLC0415

  path = analysis.simulate_reader(
    args.study, args.reader, args.accuracy, args.seed, args.always, args.key or None, args.answers
  )
  print(f'SIMULATED reader {args.reader} written to {path}')


def main(argv: list[str] | None = None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  args = _parser().parse_args(argv)
  try:
    if args.command == 'export':
      _export(args, argv)
    elif args.command == 'serve':
      _serve(args)
    elif args.command == 'analyze':
      _analyze(args)
    else:
      _simulate(args)
  except UserError as e:
    sys.stdout.flush()
    print(f'cxrjax: error: {e}', file=sys.stderr, flush=True)
    sys.exit(2)


if __name__ == '__main__':
  main()

r"""An alternated before/after comparison of the benchmark's JAX rows: this checkout against a commit.

Usage, from the repository root:

  python -m benchmarks.ab --before COMMIT --out runs/ab/ab.json [--models resnet18_28,...] [--rounds 2]
      [--reps 3] [--rep-seconds 6] [--torch-threads 2] [--no-torch-compile] [--worktree DIR]

The commit is checked out once in a detached git worktree (`--worktree`, default beside this
repository), and each side runs its own harness on its own code: `python -m benchmarks` where the
tree has `benchmarks/`, else `python -m cxrjax.bench` (the harness inside the package before the
backend seam), with PYTHONPATH set to that tree. Both sides get the same options. This checkout's
side gets `--dtypes=float32`, and so does the commit's where its harness knows the flag, so that no
bfloat16 program shares a worker with the float32 ones a side is judged on (a harness without the
flag plans float32 only on CPU).

Alternation: per round, per model, the two sides run one after the other, before first in odd
rounds and after first in even ones, so that a drift of the machine's speed over the minutes of a
pair falls on each side equally often. One measurement at a time, nothing else should run. Every
finished measurement is appended to `OUT.jsonl` at once, and a rerun with the same options skips
what is there, so an interrupted comparison resumes.

The table (`OUT.md`, and the rows in `OUT`): per model and round, JAX images/s before and after
(median of the repetitions, with the slowest and fastest), after / before, whether the two ranges
overlap, and PyTorch's images/s on both sides (the same PyTorch on both: its drift is the machine's);
then per model the median after / before over the rounds and the verdict: 'within spread' (the
ranges overlap in at least half the rounds), else 'faster' or 'slower' by the median.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks import cases, report, run

ROOT = Path(__file__).resolve().parents[1]
SIDES = ('before', 'after')


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog='python -m benchmarks.ab', description=__doc__.split('\n\n')[0])
  parser.add_argument('--before', required=True, help='the commit to compare against (any git revision)')
  parser.add_argument('--out', required=True, help='rows as JSON; OUT.jsonl (measurements) and OUT.md beside it')
  parser.add_argument('--models', default=','.join(cases.MODELS), help='comma-separated benchmark models')
  parser.add_argument('--rounds', type=int, default=2, help='alternated rounds per model')
  parser.add_argument('--reps', type=int, default=3)
  parser.add_argument('--rep-seconds', type=float, default=6.0)
  parser.add_argument('--torch-threads', default='2')
  parser.add_argument('--no-torch-compile', action='store_true')
  parser.add_argument('--worktree', default=None, help='where the commit is checked out (default: beside the repo)')
  return parser


def schedule(models: list[str], rounds: int) -> list[tuple[int, str, str]]:
  """(round, model, side) in the order they run: per round and model, the sides alternate who goes first."""
  order = []
  for r in range(1, rounds + 1):
    for m in models:
      sides = SIDES if r % 2 == 1 else SIDES[::-1]
      order += [(r, m, side) for side in sides]
  return order


def harness_command(tree: Path, args: list[str]) -> list[str]:
  """The command that runs the benchmark harness of `tree` with `args`; `--dtypes=float32` where it knows it."""
  if (tree / 'benchmarks' / '__main__.py').is_file():
    knows_dtypes = '--dtypes' in (tree / 'benchmarks' / 'run.py').read_text()
    return [sys.executable, '-m', 'benchmarks', *args, *(['--dtypes=float32'] if knows_dtypes else [])]
  if (tree / 'cxrjax' / 'bench' / '__main__.py').is_file():
    return [sys.executable, '-m', 'cxrjax.bench', *args]
  raise SystemExit(f'benchmarks.ab: error: {tree} has neither benchmarks/ nor cxrjax/bench/: no harness to run')


def resolve(revision: str) -> str:
  """The full hash of `revision` in this repository."""
  proc = subprocess.run(['git', 'rev-parse', '--verify', f'{revision}^{{commit}}'], cwd=ROOT, capture_output=True,
                        text=True)  # fmt: skip
  if proc.returncode != 0:
    raise SystemExit(f'benchmarks.ab: error: {revision!r}: not a commit of {ROOT}')
  return proc.stdout.strip()


def checkout(commit: str, worktree: str | None) -> Path:
  """A detached worktree of `commit` (made once, reused while it is at that commit)."""
  path = Path(worktree) if worktree else ROOT.parent / f'cxrjax-before-{commit[:10]}'
  if path.exists():
    head = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=path, capture_output=True, text=True).stdout.strip()
    if head != commit:
      raise SystemExit(f'benchmarks.ab: error: --worktree {path} exists at {head or "no commit"}, not {commit}')
    return path
  subprocess.run(['git', 'worktree', 'add', '--detach', str(path), commit], cwd=ROOT, check=True,
                 capture_output=True)  # fmt: skip
  return path


def pair_table(measurements: list[dict]) -> tuple[list[dict], list[dict]]:
  """(one row per model and round, one summary per model) from the measurements (`OUT.jsonl`)."""
  got = {(m['round'], row['model'], m['side']): row for m in measurements for row in m['rows']}
  rows = []
  for r, model in sorted({(r, m) for r, m, _ in got}, key=lambda k: (k[1], k[0])):
    b, a = got.get((r, model, 'before')), got.get((r, model, 'after'))
    if not (b and a and b.get('jax_images_per_s') and a.get('jax_images_per_s')):
      continue
    (b_lo, b_hi), (a_lo, a_hi) = b['jax_images_per_s_range'], a['jax_images_per_s_range']
    rows.append(dict(
      model=model, round=r, before=b['jax_images_per_s'], before_range=[b_lo, b_hi], after=a['jax_images_per_s'],
      after_range=[a_lo, a_hi], after_over_before=round(a['jax_images_per_s'] / b['jax_images_per_s'], 3),
      ranges_overlap=a_lo <= b_hi and b_lo <= a_hi, torch_before=b.get('torch_images_per_s'),
      torch_after=a.get('torch_images_per_s'),
    ))  # fmt: skip
  summary = []
  for model in sorted({r['model'] for r in rows}):
    mine = [r for r in rows if r['model'] == model]
    ratio = statistics.median(r['after_over_before'] for r in mine)
    overlap = sum(r['ranges_overlap'] for r in mine)
    verdict = 'within spread' if 2 * overlap >= len(mine) else 'faster' if ratio > 1 else 'slower'
    summary.append(dict(model=model, rounds=len(mine), median_after_over_before=round(ratio, 3),
                        rounds_overlapping=overlap, verdict=verdict))  # fmt: skip
  return rows, summary


def markdown(rows: list[dict], summary: list[dict], before: str, after: str, command: str) -> str:
  """The per-round table, then the per-model summary."""

  def f(x) -> str:
    return '-' if x is None else f'{x:.1f}'

  lines = [
    f'Before: `{before[:10]}`; after: `{after[:10]}{after[40:]}`. Command: `{command}`.',
    '',
    '| row | round | before: JAX img/s (range) | after: JAX img/s (range) | after / before | ranges overlap |'
    ' PyTorch before / after |',
    '|---|---|---|---|---:|---|---|',
  ]
  for r in rows:
    lines.append(
      f'| {r["model"]} | {r["round"]} | {f(r["before"])} ({f(r["before_range"][0])}-{f(r["before_range"][1])}) |'
      f' {f(r["after"])} ({f(r["after_range"][0])}-{f(r["after_range"][1])}) | {r["after_over_before"]:.3f} |'
      f' {"yes" if r["ranges_overlap"] else "no"} | {f(r["torch_before"])} / {f(r["torch_after"])} |'
    )
  lines += ['', '| row | rounds | median after / before | rounds with overlapping ranges | verdict |',
            '|---|---:|---:|---:|---|']  # fmt: skip
  lines += [f'| {s["model"]} | {s["rounds"]} | {s["median_after_over_before"]:.3f} | {s["rounds_overlapping"]} |'
            f' {s["verdict"]} |' for s in summary]  # fmt: skip
  return '\n'.join(lines) + '\n'


def main(argv: list[str] | None = None) -> list[dict]:
  parser = _parser()
  args = parser.parse_args(argv)
  models = [m for m in args.models.split(',') if m]
  unknown = [m for m in models if m not in cases.MODELS]
  if unknown:
    parser.error(f'--models: unknown {",".join(unknown)}; choose from {",".join(cases.MODELS)}')
  if args.rounds < 1:
    parser.error(f'--rounds: expected a positive number, got {args.rounds}')
  before = resolve(args.before)
  after = resolve('HEAD')
  diff = subprocess.run(['git', 'diff', 'HEAD'], cwd=ROOT, capture_output=True).stdout
  if diff:  # measurements of other uncommitted edits are not reused (the key holds the diff's hash)
    after += f'+uncommitted-{hashlib.sha256(diff).hexdigest()[:10]}'
    print('[ab] the working tree has uncommitted changes: "after" is HEAD with them', file=sys.stderr)
  trees = {'before': checkout(before, args.worktree), 'after': ROOT}
  options = [f'--reps={args.reps}', f'--rep-seconds={args.rep_seconds}', f'--torch-threads={args.torch_threads}']
  options += ['--no-torch-compile'] if args.no_torch_compile else []
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  log_path = out.with_suffix('.jsonl')
  key = dict(before=before, after=after, options=options)
  done = [m for m in run.read_jsonl(str(log_path)) if m.get('key') == key]
  have = {(m['round'], m['model'], m['side']) for m in done}
  for r, model, side in schedule(models, args.rounds):
    if (r, model, side) in have:
      continue
    print(f'[ab] round {r}, {model}, {side} ({trees[side]})', file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix='cxrjax-ab-') as tmp:
      rows_path = os.path.join(tmp, 'rows.json')
      cmd = harness_command(trees[side], [*options, f'--models={model}', f'--out={rows_path}'])
      env = dict(os.environ, PYTHONPATH=str(trees[side]))
      proc = subprocess.run(cmd, cwd=trees[side], env=env, stdout=subprocess.DEVNULL)
      if proc.returncode != 0 or not os.path.isfile(rows_path):
        raise SystemExit(f'benchmarks.ab: error: {side} ({" ".join(cmd)}) failed with exit code {proc.returncode}')
      rows = [x for x in json.loads(Path(rows_path).read_text()) if x.get('jax_images_per_s')]
    measurement = dict(key=key, round=r, model=model, side=side, command=cmd[1:], rows=rows)
    with open(log_path, 'a') as f:
      f.write(json.dumps(measurement) + '\n')
    done.append(measurement)
  rows, summary = pair_table(done)
  command = 'python -m benchmarks.ab ' + ' '.join(sys.argv[1:] if argv is None else argv)
  md = markdown(rows, summary, before, after, command)
  report.write(str(out), dict(before=before, after=after, command=command, rounds=rows, summary=summary), md)
  print(md, flush=True)
  return summary


if __name__ == '__main__':
  main()

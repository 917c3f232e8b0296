"""The experiment table: every method x several seeds, statistics, Grad-CAM, one report.

  python -m cxrjax.sweep --config=configs/sweep.py:cpu --workdir=runs/sweep-cpu

`plan.py`: the methods, each (method, seed) run's config and folder (pure
configuration); `__main__.py`: the command, which runs the plan and then the
report; `report.py`: aggregation, tables, figures and report.md from the
finished runs. This file imports nothing: the command's process settings (the
block-cache restart) belong to `__main__.py` alone.
"""

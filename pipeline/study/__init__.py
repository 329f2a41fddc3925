"""Robustness studies: protections x budgets x purifications x mimics (`mimicshield study`).

grid.py (the cells, as data), store.py (layout under OUTPUT, resume), workers.py (purify and
mimic units as Ray tasks/actors), run.py (`run_study`), report.py (report.html), and adapter.py,
the one module that calls the protect pipeline and the evaluation.
"""

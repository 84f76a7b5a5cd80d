"""Scoring a fitted pipeline without sklearn: one table artifact, a batch and a per-request scorer.

`tables.tabulate` reads a fitted candidate pipeline once into plain tables and constants;
`batch.batch_scorer` scores processed frames with them (`rtb predict`) and
`compiled.compile_scorer` turns them into generated Python for one raw request (`rtb serve`).
Both are trusted only after `agreement` found them equal to `predict_proba`.
"""

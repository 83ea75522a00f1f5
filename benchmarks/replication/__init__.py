"""The ESFT paper in miniature (benchmarks/replicate_paper.py's parts): data, methods, experiments, report, plots.

- ``data``: the tasks' training mixtures and their validation / test / general eval sets;
- ``methods``: what each method trains, the training loop, the learning-rate grids, one scored run;
- ``experiments``: per task the lr sweep, the seeds, the ablation; the composed (disjoint) adapters;
- ``granularity``: the expert-granularity runs (esft_lightning.analysis) and their plot;
- ``report``: summary rows, Markdown tables, the runtime estimate;
- ``plots``: routing concentration, task overlap (before / after disjoint selection).
"""

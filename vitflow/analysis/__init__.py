"""Judging and using embeddings after they are written: eval (kNN, linear probe), fitted
transforms (standardise, PCA), exports and samples.

Every function here works on an embed output folder and on a reindexed Delta index alike,
and streams the vectors part by part (:mod:`vitflow.analysis.source`), so an output larger
than memory is fine. Torch-free and Ray-free; scikit-learn and matplotlib (the ``[train]``
extra) are imported only by the functions that need them.

Modules: ``source`` (an output opened for streaming), ``knn``, ``probe``, ``evaluate``,
``leaderboard`` (its text and bar chart), ``transforms``, ``export``, ``sample``.
"""

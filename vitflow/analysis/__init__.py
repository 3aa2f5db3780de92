"""Judging and using embeddings after they are written: eval (kNN, linear probe), fitted
transforms (standardise, PCA), exports and samples, pictures, search, near-duplicates and
the report.

Every function here works on an embed output folder and on a reindexed Delta index alike,
and streams the vectors part by part (:mod:`vitflow.analysis.source`), so an output larger
than memory is fine. Torch-free and Ray-free (except a search by
image, which embeds the query with the job's model); scikit-learn, matplotlib and faiss (the
``[analysis]`` extra) are imported only by the functions that need them.

Modules: ``source`` (an output opened for streaming), ``knn``, ``probe``, ``evaluate``,
``leaderboard`` (its text and bar chart), ``transforms``, ``export``, ``sample``, ``plots``,
``search`` (faiss index, exact search), ``query`` (a query image embedded as the job did),
``dedup``, ``report``.
"""

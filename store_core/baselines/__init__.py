"""Baselines run side by side with STORE on the same split: popularity and SASRec-CE.

They read the ingested ``splits.parquet`` through :class:`~store_core.baselines.data.SequenceData`,
which rebuilds exactly the histories the generative model is prompted with, so the numbers
differ only by the model, never by the data (docs/EVALUATION.md).
"""

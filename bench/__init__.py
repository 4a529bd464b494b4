"""Benchmarks, run as scripts against the installed project (`pip install -e .`), from any folder:

    python bench/build.py --help

A script's own folder comes first on sys.path, so no script here is named like a package it
imports (`preprocess`, `shards`, `train`): the training-step benchmark is `train_step.py`.
"""

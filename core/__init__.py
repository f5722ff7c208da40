"""Shared plumbing at the bottom of the stack: params, workspace, artifacts, hashing, ledger, registry types.

Nothing here imports Prefect, DVC or any stage: every other layer builds on it.
"""

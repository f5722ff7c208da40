"""The stages of the DAG, one module each: its `STAGE` declaration, its params section and its `run`.

`tasks.registry` collects every module here; docs/architecture.md says how to add one.
"""

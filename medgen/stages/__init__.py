"""Pipeline stages: one function per CLI command (``ingest``, later ``train``, ``enhance`` ...).

Each stage module imports its heavy dependencies inside functions, so importing a stage
(or the CLI) stays cheap; import the stage you need, e.g.
``from medgen.stages.ingest import ingest``.
"""

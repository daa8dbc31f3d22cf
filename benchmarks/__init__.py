"""keyreid.benchmarks (the ``benchmarks/`` folder): speed and accuracy measured side by side.

``python benchmarks/run.py`` (or ``keyreid bench``) measures the full ViT-B model against the
reference and writes a report; ``python -m pytest benchmarks --benchmark-only`` runs the
pytest-benchmark files on the reduced model. Results and how they were taken are in RESULTS.md.
Nothing here is imported by the package's other folders.
"""

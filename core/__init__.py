"""Refinery engine: unsupervised anomaly detection with STOC-style data refinement.

The engine is pure Python + torch; it never imports a UI package. Entry points:
:mod:`core.engine` (the facade used by the app and the CLI) and :mod:`core.cli`.
"""

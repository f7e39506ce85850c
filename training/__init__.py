"""Training side: models, evaluation, tracking, tuning and export.

Importing this package is cheap; heavy libraries are imported by the modules that need them.
"""

"""Shared machinery for the persona-space course, one module per concept (see docs/conventions.md).

The package itself imports nothing, so that ``python -m utils.<module>`` runs a module that no earlier import
has loaded. Import what you need from its module: ``from utils.models import load_model``.
"""

"""The bundled presets (*.yaml), installed as the package `logitstore.presets`.

This directory stays at the checkout's top level; pyproject.toml maps it to
`logitstore.presets`, so `importlib.resources.files("logitstore.presets")` lists the
presets in a checkout (editable install) and after `pip install .` alike.
"""

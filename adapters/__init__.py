"""freeloc's own adapters, one module per architecture, installed as ``freeloc.adapters``.

Each module defines a ``freeloc.adapter.TransformerAdapter`` subclass with its model data.
They are declared as entry points of the group ``freeloc.adapters`` in freeloc's ``pyproject.toml``,
like any other package's adapters, and found through ``freeloc.registry``; the core never
imports this package. Plans shipped with an adapter lie in ``plans/`` beside the modules.
"""

"""Connectors: one module per source kind, each a plug-in in the ``eventswarm.connectors`` entry-point group."""

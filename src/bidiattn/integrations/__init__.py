"""Integrations with other libraries, each imported lazily (``bidiattn.integrations.transformers``)."""

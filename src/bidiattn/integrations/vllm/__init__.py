"""vLLM integration: bidiattn as an out-of-tree vLLM attention backend.

Usage::

    pip install 'bidiattn[vllm]'
    vllm serve google/gemma-3-27b-it --attention-backend BIDIATTN    # vLLM >= 0.32
    vllm serve google/gemma-3-27b-it --attention-backend CUSTOM      # vLLM 0.26 - 0.31
    # Python: LLM(model, attention_config={"backend": "BIDIATTN"})   (or "CUSTOM")
    # rule: BIDIATTN_RULE=official (default) | transformers | vllm (A/B against vLLM's own)

Nothing in vLLM is patched. The package's ``vllm.general_plugins`` entry point runs
:func:`register` in every vLLM process, which records the backend's class path in vLLM's
backend registry: under the new name ``BIDIATTN`` where the registry takes new names (vLLM
>= 0.32), else in its ``CUSTOM`` slot (vLLM 0.26 - 0.31 take only names of their own enum).

Layout: :mod:`.config` (which rule a served model gets, what is refused at start-up),
:mod:`.step` (a step's image ranges -> blocks -> spans, attention over vLLM's paged cache),
:mod:`.backend` (the vLLM classes; the only module that imports vLLM). Importing this package
imports no vLLM.
"""

from __future__ import annotations

import logging

__all__ = ["NAME", "CLASS_PATH", "TESTED_VLLM", "register", "registered_name"]

NAME = "BIDIATTN"
CLASS_PATH = "bidiattn.integrations.vllm.backend.BidiattnBackend"
# The vLLM releases whose interfaces this backend was written against (the GPU end-to-end test
# and benchmark run on the first); the [vllm] extra pins the range.
TESTED_VLLM = ("0.26.0",)

_log = logging.getLogger("bidiattn")


def _registry(registry):
    if registry is None:
        from vllm.v1.attention.backends import registry
    return registry


def register(registry=None) -> str | None:
    """Record the backend in vLLM's attention-backend registry; returns the name that selects
    it (``"BIDIATTN"``, or ``"CUSTOM"`` on vLLM < 0.32), or ``None`` when the ``CUSTOM`` slot
    already holds another backend (logged; not overwritten).

    Safe to call again (vLLM loads general plugins in every process, and a user may call it
    too). ``registry``: the module ``vllm.v1.attention.backends.registry`` (default), or an
    object with its ``AttentionBackendEnum`` and ``register_backend``.
    """
    registry = _registry(registry)
    enum = registry.AttentionBackendEnum
    members = enum.__members__
    if NAME in members:
        registry.register_backend(members[NAME], CLASS_PATH)
        return NAME
    if callable(getattr(enum, "register", None)):  # the registry creates names (vLLM >= 0.32)
        registry.register_backend(NAME, CLASS_PATH)
        return NAME
    custom = members["CUSTOM"]
    if custom.is_overridden() and custom.get_path() != CLASS_PATH:
        _log.warning("bidiattn: vLLM's CUSTOM attention backend is already %s; bidiattn is not registered",
                     custom.get_path())
        return None
    registry.register_backend(custom, CLASS_PATH)
    return "CUSTOM"


def registered_name(registry=None) -> str | None:
    """The registry name that currently resolves to bidiattn's backend, or ``None``."""
    try:
        registry = _registry(registry)
    except ImportError:
        return None
    members = registry.AttentionBackendEnum.__members__
    for name in (NAME, "CUSTOM"):
        member = members.get(name)
        if member is None:
            continue
        try:
            if member.get_path() == CLASS_PATH:
                return name
        except ValueError:  # CUSTOM with nothing registered
            continue
    return None

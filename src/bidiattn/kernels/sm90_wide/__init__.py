"""bidiattn's head-dim-512 kernels for SM90 (Hopper) in Gluon, forward and backward: the
``"gluon"`` backend, what ``bidiattn.attention`` runs by default at head dim 512 on Hopper.
Nothing imports this package at ``import bidiattn``; the kernel directly:

    from bidiattn.kernels.sm90_wide import forward_sm90_hd512
    out, lse = forward_sm90_hd512(q, k, v, spans, scale)

:mod:`.host` (configs, argument checks, launches) and :mod:`.plan` (the backend's tile tables)
import no Gluon at import time; :mod:`.kernel` (the forward) and :mod:`.backward_kernel` (the
backward's dV, dK and dQ passes) are the Gluon kernels, written against
``triton.experimental.gluon`` (they compile with Triton 3.6 and 3.9; run where
:func:`gluon_unavailable` says so) and imported on the first launch only.
"""

from .autograd import span_attention_sm90_wide
from .host import (CONFIGS, Sm90WideConfig, backward_sm90_hd512, check_inputs, default_config,
                   forward_sm90_hd512, gluon_unavailable)
from .plan import GluonPlan, plan_gluon

__all__ = ["CONFIGS", "GluonPlan", "Sm90WideConfig", "backward_sm90_hd512", "check_inputs",
           "default_config", "forward_sm90_hd512", "gluon_unavailable", "plan_gluon", "span_attention_sm90_wide"]

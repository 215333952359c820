"""A pytest plugin (``-p conformance.plugin``) that binds ``pyro.infer.TraceEnum_ELBO`` and
``pyro.infer.traceenum_elbo.TraceEnum_ELBO`` to :class:`plated.pyro.TVE_ELBO`.

Pytest imports ``-p`` plugins before it collects, so the binding is in place before a test module
runs ``from pyro.infer.traceenum_elbo import TraceEnum_ELBO``. Pyro's own modules that import the
class by name (``pyro.infer.JitTraceEnum_ELBO`` derives from it) are left alone.
"""

from __future__ import annotations

import pyro.infer
import pyro.infer.traceenum_elbo

from plated.pyro import TVE_ELBO

#: Pyro's class, kept for reference.
PYRO_TRACEENUM_ELBO = pyro.infer.traceenum_elbo.TraceEnum_ELBO

#: The name bound, in each module that Pyro's tests import it from.
NAME = "TraceEnum_ELBO"
for _module in (pyro.infer, pyro.infer.traceenum_elbo):
    setattr(_module, NAME, TVE_ELBO)

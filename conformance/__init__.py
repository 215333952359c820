"""Conformance runs: third-party test suites run against the project's drop-in classes.

* :mod:`conformance.plugin` — a pytest plugin that binds Pyro's ``TraceEnum_ELBO`` to
  :class:`plated.pyro.TVE_ELBO` before any test module is imported.
* :mod:`conformance.pyro_enum` — the runner for Pyro's ``tests/infer/test_enum.py``
  (``python -m conformance.pyro_enum``): prints the pass count, fails below :data:`THRESHOLD`,
  and lists the tests that check a deliberate difference, each with its reason.
"""

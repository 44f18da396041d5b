"""The web side of edp: the ingest endpoint, the dashboard, its JSON API and ``/metrics``.

:mod:`edp.web.figures` has no web dependency (``edp status`` uses it); the other
modules need the ``web`` extra: ``pip install 'edp[web]'``.
"""

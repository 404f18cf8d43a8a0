"""The operator console: a second HTTP listener, apart from the tracking API, serving the
dashboard (pages), the admin API (``/api/``), ``/metrics`` and ``/health``.

It runs in one receiver process (the first, with ``--processes N``), on its own socket and its
own database pool; every database query runs in a thread, so the tracking API's event loop only
ever waits for the GIL, never for a console query.
"""

"""Real-browser tests: Chromium (through Playwright) driving the real Segment and RudderStack
browser SDKs against a real ``trackrelay run``.

A package, so that its ``conftest.py`` is imported as ``browser.conftest`` and does not take the
module name ``conftest`` from ``tests/conftest.py``, which the shared helpers import.
"""

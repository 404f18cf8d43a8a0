"""``GET /openapi.json``: the OpenAPI 3.1 description of the public API, the file shipped beside
this module (receiver/openapi.json), served as its bytes, read once."""

from __future__ import annotations

import functools
from importlib import resources

from receiver.answers import JSON
from receiver.context import ReceiverContext
from receiver.handlers import ApiHandler


@functools.cache
def openapi_document() -> bytes:
    """The shipped document, exactly as it is in the package."""
    return resources.files("receiver").joinpath("openapi.json").read_bytes()


class OpenApiHandler(ApiHandler):
    def initialize(self, ctx: ReceiverContext, document: bytes = b"") -> None:  # type: ignore[override]
        super().initialize(ctx)
        self.document = document

    def get(self) -> None:
        self.set_header("Content-Type", JSON)
        self.finish(self.document)

"""trackrelay's pipeline: storage, the pure decoding and validation of Segment-style messages,
and (later) the worker that delivers them. Never imports ``receiver``."""

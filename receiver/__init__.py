"""trackrelay's receiver: the Tornado HTTP Tracking API that commits every accepted request to
the outbox before it answers."""

"""The BentoML service: wire types, the session store, the micro-batcher, errors, metrics."""

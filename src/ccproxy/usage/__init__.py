"""Usage records: one row per admitted request, written off the request path."""

"""The method core: the pair's decisions, pure (no I/O, no event loop, no gRPC).

``pairstate`` (the pair state machine), ``pair`` (the primary's pair record
and its decisions), ``driver`` (the coordinator's decisions), ``receiver`` (the secondary's
resync decisions), ``resync_window`` (the primary's resync send window), ``extents``
(failed-extent derivation), ``classify`` (NACK classification), ``window``
(the replication window), ``activity`` (the activity log), ``resync_plan``
(resync planning: what the next round is) and ``vocab`` (the names every role
agrees on).
The roles (``primary/``, ``secondary/``, ``coordinator/``) import this and the
foundation, never each other; see docs/LAYERS.md. import-linter checks it.
"""

"""syncrep: synchronous block-volume replication with snapshot-diff resync.

Shared code lives here: the block store (``syncrep.blockstore``), the generated
protocol (``syncrep.pb``), the one place that builds gRPC servers and channels
(``syncrep.rpc``), and the command line (``syncrep.cli``). The role-specific
code lives beside it in the top-level packages ``primary``, ``secondary`` and
``coordinator``; ``deploy`` holds the local multi-process harness.
"""

__version__ = "0.1.0"

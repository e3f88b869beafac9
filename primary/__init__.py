"""The primary role: the client write path and synchronous replication to the secondary."""

"""The coordinator: pair state, epochs, failed-extent derivation, node registry."""

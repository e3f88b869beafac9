"""The secondary role: applies replicated writes and resync streams, answers ack or NACK."""

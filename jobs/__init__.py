"""Background jobs (huey): task functions, the queue built from settings, and the consumer."""

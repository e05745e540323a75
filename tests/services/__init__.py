"""Real services for the tests (PostgreSQL, S3 over moto), started by session fixtures."""

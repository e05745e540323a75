"""Operations: metrics, health, logs, the usage window, and the catalog's sync loop."""

"""OpenAI's Batch API: routes, shapes, the line runner and the batch runner."""

"""The engine room: the Engine interface, the in-process vLLM engine and its two vLLM plugins.

It is the only package that imports vllm. Nothing here is imported at package level, so vLLM's
plugin loader can import `server.engine.wait` without pulling in the engine.
"""

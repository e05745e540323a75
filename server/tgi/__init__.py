"""TGI's and LoRAX's API: /generate, /generate_stream, /info, and merged adapters."""

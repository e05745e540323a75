"""`python -m server`: the same as the `lora-gateway` command."""

from server.commands.cli import main

if __name__ == "__main__":  # the engine's worker is a spawned process that re-imports __main__
    raise SystemExit(main())

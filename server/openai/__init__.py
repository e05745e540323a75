"""OpenAI inference: completions, chat and models, and the generation service behind them."""

"""The web console at /ui: static files and the route that serves them."""

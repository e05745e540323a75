"""The HTTP edge every surface shares: auth, dependencies, errors, middleware, limits, responses."""

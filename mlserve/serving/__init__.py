"""mlserve inside another serving framework: the app a replica runs (asgi.py), Ray Serve's deployment (ray_app.py)."""

"""Serving with more than one process: N engine replicas behind Ray Serve (moeserve.deploy.ray_serve)."""

"""The Serve application: FastAPI ingress (routers, dependencies, settings) and the app builder that binds the
stage deployments together."""

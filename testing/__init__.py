"""Test and benchmark helpers shipped beside the service but not inside it: a private local Ray cluster
(`testing.local_cluster`), a throw-away S3 endpoint (`testing.s3_server`) and test adapters (`testing.adapters`).
Nothing under `lightray/`, `serve_app/` or `deployments/` imports this package."""

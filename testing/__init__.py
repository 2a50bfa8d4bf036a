"""Test and benchmark helpers shipped beside the service but not inside it: a private local Ray cluster
(`testing.local_cluster`), a throw-away S3 endpoint (`testing.s3_server`), test adapters (`testing.adapters`) and
an app served over HTTP from a thread (`testing.http_server`). Nothing under `lightray/`, `serve_app/` or
`deployments/` imports this package."""

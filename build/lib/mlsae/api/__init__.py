"""The original's name for the explorer server: `python -m mlsae.api --repo_id ...` starts
`mlsae.explorer`, whose `/api/py/` routes answer as the original's did."""

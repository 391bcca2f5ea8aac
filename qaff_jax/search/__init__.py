"""Search your own photos with a trained run.

  python -m qaff_jax.search index --workdir RUN --images DIR --index INDEX
  python -m qaff_jax.search query --index INDEX --image q.jpg [--box x0,y0,x1,y1]
  python -m qaff_jax.search serve --index INDEX [--port 8080]

`index` (the library behind all three) extracts and stores descriptors of a
folder incrementally; `server` is the local web page (FastAPI + uvicorn, the
`search` extra of pyproject.toml); `__main__` is the thin command line.
"""

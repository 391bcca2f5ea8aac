"""The local search page: FastAPI app over a `FolderIndex` and its network.

  GET  /                      the page (qaff_jax/search/page.py)
  GET  /api/info              index size, model, unreadable files, QAFF layout
  GET  /api/images            indexed images, paged (?offset=&limit=)
  GET  /api/thumb/{id}        a JPEG thumbnail, cached under <index>/thumbs/
  GET  /api/image/{id}        the image (upright JPEG, long side <= VIEW_SIDE)
  POST /api/query             body = the image file's bytes (at most
                              MAX_UPLOAD_BYTES: 413 beyond; not an image: 400);
                              ?k=20&box=x0,y0,x1,y1 (fractions of the width /
                              height of the upright image)
  POST /api/query/{id}        the same with an indexed image as the query

Images are only ever served by their row number in the index; a file name
from a request is never opened, and a stored path whose real location is
outside the images folder (a link) is refused. The network is loaded once,
before the server starts, and extractions run one at a time.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tempfile
import threading
import time

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from PIL import Image, ImageOps
from starlette.concurrency import run_in_threadpool

from qaff_jax.search import index as lib
from qaff_jax.search import page

MAX_UPLOAD_BYTES = 20 * 2**20   # 20 MiB
THUMB_SIDE = 256
VIEW_SIDE = 1280
MAX_K = 200


def _parse_nbox(text: str | None) -> tuple[float, ...] | None:
  try:
    box = lib.parse_box(text)
  except ValueError as e:
    raise HTTPException(400, str(e)) from None
  if box is not None and not all(-1e-6 <= v <= 1 + 1e-6 for v in box):
    raise HTTPException(400, "box: fractions of the image in [0, 1] expected")
  return box


def _check_k(k: int) -> int:
  if not 1 <= k <= MAX_K:
    raise HTTPException(400, f"k={k}: between 1 and {MAX_K}")
  return k


def _verify_image(data: bytes) -> None:
  """PIL's header check; 400 when the bytes are not an image."""
  try:
    with Image.open(io.BytesIO(data)) as im:
      im.verify()
  except Exception:  # PIL raises many kinds for garbage
    raise HTTPException(400, "not an image (PIL cannot read it)") from None


def _jpeg_of(path: str, side: int) -> bytes:
  with Image.open(path) as im:
    im.draft("RGB", (side, side))
    im = ImageOps.exif_transpose(im)
    im = im.convert("RGB")
    im.thumbnail((side, side), Image.Resampling.BILINEAR)
    out = io.BytesIO()
    im.save(out, "JPEG", quality=85)
    return out.getvalue()


def create_app(index: lib.FolderIndex, model: lib.Extractor | None, *,
               max_upload_bytes: int = MAX_UPLOAD_BYTES) -> FastAPI:
  """The app; `model` may be None (then only unboxed queries by id work)."""
  app = FastAPI(title="qaff_jax search", docs_url=None, redoc_url=None, openapi_url=None)
  lock = threading.Lock()
  thumbs = os.path.join(index.dir, lib.THUMBS_DIR)

  def row_of(image_id: str) -> int:
    if not image_id.isdigit() or int(image_id) >= len(index):
      raise HTTPException(404, "no such image id")
    return int(image_id)

  def file_of(row: int) -> str:
    try:
      return index.file_of(row)
    except KeyError:
      raise HTTPException(404, "no such image id") from None

  def answer(q: dict, k: int, source: dict, t0: float) -> dict:
    return {"query": {**source, "size": list(q["size"]) if q.get("size") else None},
            "results": [{**r, "thumb": f"api/thumb/{r['id']}"}
                        for r in index.results(q["descriptor"], k)],
            "fusion": lib.split_fusion(q.get("fusion_weights"), index.fusion_layout),
            "ms": round(1e3 * (time.perf_counter() - t0), 1)}

  def describe(source, nbox) -> dict:
    if model is None:
      raise HTTPException(503, "no model loaded: only indexed images without a box")
    with lock:
      try:
        return model.describe(source, nbox=nbox)
      except ValueError as e:
        raise HTTPException(400, str(e)) from None

  @app.get("/", response_class=HTMLResponse)
  def home():
    return HTMLResponse(page.HTML, headers={"Cache-Control": "no-store"})

  @app.get("/api/info")
  def info():
    m = index.meta["model"]
    return {"images": len(index), "images_root": index.root, "unreadable": index.failed,
            "model": {k: m[k] for k in ("workdir", "step", "head", "backbone", "dim")},
            "fusion": index.fusion_layout,
            "searcher": "scann" if index.searcher is not None else "exact",
            "updated": index.meta.get("updated"), "max_upload_bytes": max_upload_bytes,
            "max_k": MAX_K}

  @app.get("/api/images")
  def images(offset: int = 0, limit: int = 60):
    offset, limit = max(0, offset), max(1, min(limit, 500))
    items = [{"id": i, "path": index.paths[i], "thumb": f"api/thumb/{i}"}
             for i in range(offset, min(len(index), offset + limit))]
    return {"total": len(index), "offset": offset, "items": items}

  @app.get("/api/thumb/{image_id}")
  def thumb(image_id: str):
    row = row_of(image_id)
    path = file_of(row)
    key = hashlib.sha1(f"{index.paths[row]}\0{int(index.sizes[row])}\0"
                       f"{int(index.mtimes[row])}".encode()).hexdigest()[:20]
    cached = os.path.join(thumbs, f"{key}.jpg")
    if not os.path.isfile(cached):
      try:
        data = _jpeg_of(path, THUMB_SIDE)
      except Exception:
        raise HTTPException(404, "image no longer readable") from None
      os.makedirs(thumbs, exist_ok=True)
      fd, tmp = tempfile.mkstemp(dir=thumbs, suffix=".tmp")
      with os.fdopen(fd, "wb") as f:
        f.write(data)
      os.replace(tmp, cached)
    return FileResponse(cached, media_type="image/jpeg",
                        headers={"Cache-Control": "max-age=86400"})

  @app.get("/api/image/{image_id}")
  def image(image_id: str):
    try:
      data = _jpeg_of(file_of(row_of(image_id)), VIEW_SIDE)
    except HTTPException:
      raise
    except Exception:
      raise HTTPException(404, "image no longer readable") from None
    return Response(data, media_type="image/jpeg")

  @app.post("/api/query")
  async def query_upload(request: Request, k: int = 20, box: str | None = None):
    t0 = time.perf_counter()
    k, nbox = _check_k(k), _parse_nbox(box)
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_upload_bytes:
      raise HTTPException(413, f"upload over {max_upload_bytes} bytes")
    body = bytearray()
    async for part in request.stream():
      body += part
      if len(body) > max_upload_bytes:
        raise HTTPException(413, f"upload over {max_upload_bytes} bytes")
    data = bytes(body)
    if not data:
      raise HTTPException(400, "empty upload: send the image file as the request body")
    _verify_image(data)
    q = await run_in_threadpool(describe, data, nbox)
    return answer(q, k, {"source": "upload", "box": nbox}, t0)

  @app.post("/api/query/{image_id}")
  def query_indexed(image_id: str, k: int = 20, box: str | None = None):
    t0 = time.perf_counter()
    k, nbox, row = _check_k(k), _parse_nbox(box), row_of(image_id)
    source = {"source": "indexed", "id": row, "path": index.paths[row], "box": nbox}
    if nbox is None:   # the stored descriptor is this image's descriptor
      fw = None if index.fusion is None else index.fusion[row]
      q = {"descriptor": index.descriptor[row], "fusion_weights": fw, "size": None}
      return answer(q, k, source, t0)
    return answer(describe(file_of(row), nbox), k, source, t0)

  @app.exception_handler(HTTPException)
  async def http_error(_, exc: HTTPException):
    return JSONResponse({"error": exc.detail}, status_code=exc.status_code)

  return app


def serve(index_dir: str, *, host: str = "127.0.0.1", port: int = 8080) -> None:
  """Loads the index and its network once, then serves until interrupted."""
  import uvicorn
  index = lib.FolderIndex(index_dir)
  model = lib.open_model(index)
  # Compile the common shape once, so the first visitor does not wait for it.
  model([np.zeros((64, 64, 3), np.uint8)])
  if host not in ("127.0.0.1", "localhost", "::1"):
    logging.warning("serving on %s: anyone who can reach it can search and see the "
                    "indexed images", host)
  print(f"{len(index)} images from {index.root}; open http://{host}:{port}/", flush=True)
  uvicorn.run(create_app(index, model), host=host, port=port, log_level="warning")

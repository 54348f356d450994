"""A small web page that writes a report for uploaded radiographs: ``cxrgen serve``.

``GET /`` shows an upload form for a frontal and an optional lateral view. ``POST /``
returns the page with the report and, for attention models, one attention map per word.
``POST /api/report`` takes the same form fields and returns the prediction as JSON, and
``GET /health`` reports the loaded model. The predictor is loaded once, before the server
starts. The page has no authentication, so ``cxrgen serve`` binds to 127.0.0.1 by default.
"""

from __future__ import annotations

import base64
import io
import logging
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import jinja2
from fastapi import FastAPI, File, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image, UnidentifiedImageError

from pipeline.attention_maps import load_views, render_word_map
from pipeline.errors import PipelineError
from pipeline.images import ImageDecodeError
from pipeline.predict import Prediction, ReportPredictor

logger = logging.getLogger(__name__)

ACCEPTED_FORMATS = {"PNG": ".png", "JPEG": ".jpg"}
MAP_VIEW_SIZE = 160  # side of each view in a page's attention maps, in pixels
FORM_OVERHEAD_BYTES = 64 * 1024  # multipart boundaries and headers around the two files
FrontalFile = Annotated[UploadFile, File(description="frontal radiograph, PNG or JPEG")]
LateralFile = Annotated[UploadFile | None, File(description="optional lateral radiograph of the same study")]


@dataclass(frozen=True)
class UploadLimits:
    """Limits on each uploaded radiograph: file size in bytes and decoded pixel count."""

    max_bytes: int = 20 * 2**20
    max_pixels: int = 25_000_000

    @property
    def max_request_bytes(self) -> int:
        return 2 * self.max_bytes + FORM_OVERHEAD_BYTES


class UploadError(PipelineError, ValueError):
    """An upload that breaks a limit or is no PNG or JPEG radiograph; ``status`` is the HTTP status."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def check_upload(name: str, data: bytes, limits: UploadLimits) -> str:
    """Check one uploaded file against the limits and return the suffix of its format.

    Raises UploadError with status 400 (empty), 413 (too many bytes), 415 (not PNG or
    JPEG) or 422 (too many pixels).
    """
    if not data:
        raise UploadError(f"{name}: the file is empty; choose a PNG or JPEG radiograph", 400)
    if len(data) > limits.max_bytes:
        raise UploadError(
            f"{name}: {len(data) / 2**20:.1f} MiB is over the limit of {limits.max_bytes / 2**20:g} MiB per image", 413
        )
    try:
        with warnings.catch_warnings():
            # Pillow warns above its own limit; the pixel check below gives the user a message instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
        with image:
            image_format, (width, height) = image.format, image.size
    except (UnidentifiedImageError, OSError):
        raise UploadError(f"{name}: not an image that can be read; upload a PNG or JPEG file", 415) from None
    except Image.DecompressionBombError:
        raise UploadError(f"{name}: rejected as a decompression bomb; upload a smaller image", 422) from None
    if image_format not in ACCEPTED_FORMATS:
        raise UploadError(f"{name}: {image_format} images are not accepted; upload a PNG or JPEG file", 415)
    if width * height > limits.max_pixels:
        raise UploadError(
            f"{name}: {width}x{height} is {width * height / 1e6:.1f} megapixels, over the limit of "
            f"{limits.max_pixels / 1e6:g} megapixels; downscale the image", 422,
        )
    return ACCEPTED_FORMATS[image_format]


def create_app(predictor: ReportPredictor, limits: UploadLimits = UploadLimits()) -> FastAPI:
    """Build the web app around a loaded predictor."""
    app = FastAPI(title="cxrgen", docs_url=None, redoc_url=None, openapi_url=None)
    page = _page_renderer(predictor, limits)

    app.middleware("http")(_request_size_guard(limits, page))
    app.exception_handler(RequestValidationError)(_form_error_handler(page))

    @app.get("/", response_class=HTMLResponse)
    def form() -> Response:
        return page()

    @app.post("/", response_class=HTMLResponse)
    def report_page(frontal: FrontalFile, lateral: LateralFile = None) -> Response:
        try:
            prediction, maps = _predict_uploads(predictor, limits, frontal, lateral, with_maps=True)
        except UploadError as error:
            logger.info("serve: rejected upload: %s", error)
            return page(error=str(error), status=error.status)
        return page(prediction=prediction, maps=maps)

    @app.post("/api/report")
    def report_json(frontal: FrontalFile, lateral: LateralFile = None) -> Response:
        try:
            prediction, _ = _predict_uploads(predictor, limits, frontal, lateral, with_maps=False)
        except UploadError as error:
            logger.info("serve: rejected upload: %s", error)
            return JSONResponse({"error": str(error)}, status_code=error.status)
        return JSONResponse(prediction.as_dict())

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": predictor.model_name, "attention": predictor.has_attention}

    return app


def _form_error_handler(page):
    """Build the handler that returns 422 for a form without the frontal file, or a body that is not a form."""

    async def reject_bad_form(request: Request, error: RequestValidationError) -> Response:
        fields = sorted({str(item["loc"][-1]) for item in error.errors() if item.get("loc")})
        message = UploadError(
            f"the form lacks a valid {' and '.join(fields) or 'body'}; send a multipart form with a frontal "
            "file and an optional lateral file", 422,
        )
        logger.info("serve: rejected %s %s: %s", request.method, request.url.path, message)
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": str(message)}, status_code=422)
        return page(error=str(message), status=422)

    return reject_bad_form


def _request_size_guard(limits: UploadLimits, page):
    """Build the middleware that rejects POSTs by their Content-Length before the form is read."""

    async def reject_large_requests(request: Request, call_next):
        """Reject uploads without a Content-Length (411) or above the limit (413)."""
        if request.method != "POST":
            return await call_next(request)
        length = request.headers.get("content-length", "")
        error = None
        if not length.isdigit():
            error = UploadError("the request has no Content-Length; send the form from a browser or with curl -F", 411)
        elif int(length) > limits.max_request_bytes:
            megabytes = limits.max_bytes / 2**20
            error = UploadError(f"the upload is too large: at most two images of {megabytes:g} MiB each", 413)
        if error is None:
            return await call_next(request)
        logger.info("serve: rejected %s %s: %s", request.method, request.url.path, error)
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": str(error)}, status_code=error.status)
        return page(error=str(error), status=error.status)

    return reject_large_requests


def _page_renderer(predictor: ReportPredictor, limits: UploadLimits):
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("pipeline", "templates"), autoescape=True, undefined=jinja2.StrictUndefined
    )
    template = environment.get_template("page.html")

    def render(prediction: Prediction | None = None, maps: list[dict] | None = None, error: str | None = None,
               status: int = 200) -> HTMLResponse:
        model_warnings = predictor.settings.warnings()
        notes = [note for note in prediction.warnings if note not in model_warnings] if prediction else []
        html = template.render(
            model=predictor.model_name, model_warnings=model_warnings, has_attention=predictor.has_attention,
            max_megabytes=f"{limits.max_bytes / 2**20:g}", max_megapixels=f"{limits.max_pixels / 1e6:g}",
            prediction=prediction, notes=notes, maps=maps or [], error=error,
        )
        return HTMLResponse(html, status_code=status)

    return render


def _predict_uploads(
    predictor: ReportPredictor, limits: UploadLimits, frontal: UploadFile, lateral: UploadFile | None, with_maps: bool
) -> tuple[Prediction, list[dict]]:
    """Check and save the uploads, write the report and, if asked, render its attention maps.

    Raises UploadError for a file that breaks a limit or cannot be decoded.
    """
    uploads = [("frontal", frontal)]
    if lateral is not None and lateral.filename:
        uploads.append(("lateral", lateral))
    with tempfile.TemporaryDirectory(prefix="cxrgen-upload-") as folder:
        paths = []
        for name, upload in uploads:
            # The middleware has capped the request size, so reading a whole file is bounded.
            data = upload.file.read()
            path = Path(folder) / f"{name}{check_upload(f'{name} view', data, limits)}"
            path.write_bytes(data)
            paths.append(path)
        try:
            prediction = predictor.predict(*paths)
            maps = _attention_maps(prediction, paths, limits) if with_maps else []
        except ImageDecodeError as error:
            # The message names the temporary file; the user knows it by its view name.
            message = str(error)
            for (name, _), path in zip(uploads, paths, strict=True):
                message = message.replace(str(path), f"{name} view")
            raise UploadError(message, 422) from None
    logger.info("serve: %d view(s), %d words", len(paths), len(prediction.words))
    return prediction, maps


def _attention_maps(prediction: Prediction, paths: list[Path], limits: UploadLimits) -> list[dict]:
    """Render one base64 PNG per word: {"word", "png"}; none for a model without attention."""
    if prediction.attention is None:
        return []
    views = load_views(paths if len(paths) == 2 else paths * 2, MAP_VIEW_SIZE, limits.max_pixels)
    maps = []
    for position, word in enumerate(prediction.words, start=1):
        buffer = io.BytesIO()
        render_word_map(views, prediction.attention[position - 1], f"{position}. {word}").save(buffer, format="PNG")
        maps.append({"word": word, "png": base64.b64encode(buffer.getvalue()).decode("ascii")})
    return maps

"""schemathesis hooks for the fuzz run (SCHEMATHESIS_HOOKS=fuzz_hooks): one check of our own.

A schema can say a body holds image files, or base64 text; not that the bytes decode as an
image, nor how many pixels it has. So for the routes that take images, schemathesis's
`positive_data_acceptance` is replaced by this stricter-where-it-can check: a schema-valid
request may be refused only for its images' content (each such refusal's code is listed
below); any other refusal of a schema-valid request (a parameter or body shape the schema
allowed) fails, as it would there.
"""

from __future__ import annotations

import re

import schemathesis

IMAGE_ROUTES = re.compile(r"^/(classify|detect|embed|verify|stylize)$")
# Refusals that depend on the bytes of an image, never on the request's shape; limits of the
# model a request names or of the server's configuration, which one static document for every
# model cannot hold (top_k at most the model's classes, a model of the route's task, images per
# request); and a rule OpenAPI cannot state: a parameter given both in the query and in the
# JSON body must agree.
CONTENT_CODES = {
    "empty_image", "invalid_image", "unsupported_image", "image_too_large", "too_many_pixels",
    "image_too_small", "bad_aspect_ratio", "invalid_base64",
    "invalid_top_k", "wrong_task", "too_many_images", "invalid_style",
    "conflicting_parameters",
}  # fmt: skip
ACCEPTED = {200, 404, 503}  # answered, a model the request named is not served, busy


@schemathesis.check
def image_content_refusals_only(ctx, response, case) -> bool | None:
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive:
        return None
    if not IMAGE_ROUTES.match(case.operation.path) or response.status_code in ACCEPTED:
        return None
    try:
        code = response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        code = None
    if code not in CONTENT_CODES:
        raise AssertionError(
            f"a schema-valid request was refused with {response.status_code} {code}: the schema "
            "must say what the server requires"
        )
    return None

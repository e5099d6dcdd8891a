"""Request and response schemas of the HTTP API (they make the OpenAPI document)."""

from __future__ import annotations

from typing import Annotated, Any, cast

from pydantic import BaseModel, ConfigDict, Field

from convserve.service.wire import BASE64_PATTERN
from convserve.spec import DetectSpec, EmbedSpec, InputSpec, StylizeSpec

# A real image for the documents' examples (an 8 x 8 black PNG): requests built from them work.
PNG_8X8_BASE64 = (
    "iVBORw0KGgoAAAANSUhEUgAAAAgAAAAICAAAAADhZOFXAAAADElEQVR4nGNgoA4AAABIAAEuuDx+AAAAAElFTkSuQmCC"
)
Base64Text = Annotated[str, Field(json_schema_extra={"pattern": BASE64_PATTERN})]
# A style: an index, or a blend of weighted indices ("7", "3:0.5,12:0.5").
STYLE_PATTERN = r"^[0-9]+(:[0-9]*\.?[0-9]+)?(,[0-9]+(:[0-9]*\.?[0-9]+)?)*$"


def json_body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """`model`'s JSON schema with its nested definitions inlined, so it stands alone inside a
    route's request body (references to `$defs` would point nowhere in the OpenAPI document)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            mapping = cast(dict[str, Any], node)
            ref = mapping.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return inline(defs[ref.removeprefix("#/$defs/")])
            return {k: inline(v) for k, v in mapping.items()}
        if isinstance(node, list):
            return [inline(v) for v in cast(list[Any], node)]
        return node

    return inline(schema)


class Prediction(BaseModel):
    label: str = Field(examples=["Ankle boot"])
    index: int = Field(ge=0, description="class index in the model's output", examples=[9])
    probability: float = Field(ge=0.0, le=1.0, examples=[0.974])


class ImageResult(BaseModel):
    filename: str | None = Field(default=None, description="the part's filename, as uploaded")
    predictions: list[Prediction] = Field(description="most likely first")


class ClassifyResponse(BaseModel):
    model: str = Field(
        description="store tag of the model that answered",
        examples=["fashion-lenet5:oxpa3ixhw64noax4"],
    )
    results: list[ImageResult] = Field(description="one per image, in the order sent")


class EncodedImage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data: str = Field(
        description="base64 of the image file's bytes (a data: URL is accepted too)",
        examples=[PNG_8X8_BASE64],
        json_schema_extra={"pattern": BASE64_PATTERN},
    )
    filename: str | None = Field(
        default=None, description="echoed in the result", examples=["boot.png"]
    )


class ImagesBody(BaseModel):
    """The images of a JSON request; each route's JSON body is its parameters and these."""

    model_config = ConfigDict(extra="forbid")

    images: list[EncodedImage | Base64Text] = Field(
        min_length=1, description="base64-encoded image files, or objects with data + filename"
    )


class ModelVersion(BaseModel):
    version: str = Field(examples=["oxpa3ixhw64noax4"])
    tag: str = Field(examples=["fashion-lenet5:oxpa3ixhw64noax4"])
    default: bool = Field(description="answers requests that name this model but no version")
    created: str = Field(description="ISO 8601 time the model was saved to the store")
    task: str = Field(description="classify, detect, embed or stylize", examples=["classify"])
    routes: list[str] = Field(description="the REST routes that serve it", examples=[["/classify"]])
    architecture: str = Field(examples=["lenet5"])
    dataset: str = Field(description="what it was trained on", examples=["fashion-mnist"])
    precision: str = Field(description="fp32, or int8 (statically quantized)", examples=["fp32"])
    input: InputSpec = Field(description="the preprocessing recipe")
    recipe: str = Field(
        description="the recipe in words",
        examples=["stretch to 28x28, bilinear, grey, x/255, mean/std, NCHW"],
    )
    output: str | None = Field(default=None, description="classify: logits or probabilities")
    labels: list[str]
    detect: DetectSpec | None = None
    embed: EmbedSpec | None = None
    stylize: StylizeSpec | None = None
    provider: str = Field(
        description="active ONNX Runtime execution provider", examples=["CPUExecutionProvider"]
    )
    sha256: str = Field(description="of the ONNX file, verified at start-up")
    metrics: dict[str, float] = Field(
        description="recorded at training/export", examples=[{"test_accuracy": 0.9056}]
    )


class ServedModelInfo(BaseModel):
    name: str = Field(examples=["fashion-lenet5"])
    versions: list[ModelVersion]


class ModelsResponse(BaseModel):
    default: str = Field(description="tag of the model used when a request names none")
    models: list[ServedModelInfo]


class Box(BaseModel):
    x1: float = Field(description="left, in the upload's pixels")
    y1: float = Field(description="top")
    x2: float = Field(description="right (one past the last column)")
    y2: float = Field(description="bottom (one past the last row)")


class Detection(BaseModel):
    label: str = Field(examples=["Sneaker"])
    index: int = Field(ge=0, examples=[7])
    score: float = Field(ge=0.0, le=1.0, description="objectness x class probability")
    box: Box


class DetectResult(BaseModel):
    filename: str | None = None
    width: int = Field(description="the upload's width, pixels")
    height: int = Field(description="the upload's height, pixels")
    detections: list[Detection] = Field(description="best score first")


class DetectResponse(BaseModel):
    model: str = Field(examples=["fashion-detector:oxpa3ixhw64noax4"])
    results: list[DetectResult] = Field(description="one per image, in the order sent")


class EmbedResult(BaseModel):
    filename: str | None = None
    embedding: list[float] = Field(description="unit length")


class EmbedResponse(BaseModel):
    model: str = Field(examples=["fashion-siamese:oxpa3ixhw64noax4"])
    results: list[EmbedResult] = Field(description="one per image, in the order sent")


class VerifyResponse(BaseModel):
    model: str = Field(examples=["fashion-siamese:oxpa3ixhw64noax4"])
    distance: float = Field(ge=0.0, description="squared L2 distance between the embeddings")
    threshold: float = Field(description="tau: the same identity when distance <= tau")
    same: bool


class ErrorBody(BaseModel):
    code: str
    message: str
    request_id: str | None = None  # the X-Request-ID of the request


class ErrorResponse(BaseModel):
    error: ErrorBody

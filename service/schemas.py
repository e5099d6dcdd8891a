"""Request and response schemas of the HTTP API (they make the OpenAPI document)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class Prediction(BaseModel):
    label: str = Field(examples=["Ankle boot"])
    index: int = Field(ge=0, description="class index in the model's output", examples=[9])
    probability: float = Field(ge=0.0, le=1.0, examples=[0.974])


class ImageResult(BaseModel):
    filename: str | None = Field(None, description="the part's filename, as uploaded")
    predictions: list[Prediction] = Field(description="most likely first")


class ClassifyResponse(BaseModel):
    model: str = Field(
        description="store tag of the model that answered",
        examples=["fashion-lenet5:oxpa3ixhw64noax4"],
    )
    results: list[ImageResult] = Field(description="one per uploaded image, in upload order")

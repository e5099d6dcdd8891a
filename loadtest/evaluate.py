"""The zoo's accuracy goals measured through a running server's HTTP API, as a client sees the
models (not in-process):

    python -m convserve.loadtest.evaluate detect --url http://127.0.0.1:3000    # mAP, /detect
    python -m convserve.loadtest.evaluate verify --url http://127.0.0.1:3000    # ROC-AUC, /verify
    python -m convserve.loadtest.evaluate stylize --url http://127.0.0.1:3000 --out DIR/x.json

detect  the 2,000 test scenes (garments of the test split only) as PNG uploads to /detect with
        the evaluation's floor (score_threshold 0.01, as detection papers evaluate), then
        mAP@0.5 (all-points) and COCO mAP@0.5:0.95 against the true boxes.
verify  pairs of test images of the classes the network never saw (Sneaker, Bag, Ankle boot),
        half the same class, half not, each pair one POST /verify; ROC-AUC of the distance,
        accuracy of the server's own same/different at its threshold, ROC-AUC per kind of
        pair (two bags against a sneaker and a boot, ...) and their distances drawn
        (DIR/distances.png beside the JSON); and the same on seen classes for contrast.
stylize three of scikit-image's photos in six styles and one blend through /stylize, drawn
        as one picture (DIR/styles.png beside the JSON), and the time of one request at 256,
        512 and 1024 px (the median of 3, one at a time).

Writes a JSON summary (--out) and prints it.
"""

from __future__ import annotations

import argparse
import io
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from tqdm import tqdm

from convserve.models.data import TEST_SCENES, load_fashion_mnist, load_scenes
from convserve.models.evaluation import (
    mean_average_precision,
    roc_auc,
    roc_auc_by_kind,
    verification_pairs,
)
from convserve.spec import FASHION_MNIST_LABELS
from convserve.tasks.detect import Detections

UNSEEN, SEEN = (7, 8, 9), (0, 1, 2, 3, 4, 5, 6)


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    return buf.getvalue()


def evaluate_detect(url: str, model: str | None, scenes: int, workers: int) -> dict:
    test = load_scenes("test", scenes)
    params: dict[str, str | float] = {"score_threshold": 0.01, "max_detections": 100}
    if model:
        params["model"] = model

    def one(i: int) -> Detections:
        files = [("images", (f"scene-{i}.png", _png(test.images[i])))]
        resp = httpx.post(f"{url}/detect", params=params, files=files, timeout=60)
        resp.raise_for_status()
        found = resp.json()["results"][0]["detections"]
        boxes = np.array([[d["box"][k] for k in ("x1", "y1", "x2", "y2")] for d in found])
        return Detections(
            boxes.reshape(-1, 4),
            np.array([d["score"] for d in found]),
            np.array([d["index"] for d in found], dtype=np.int64),
        )

    with ThreadPoolExecutor(workers) as pool:
        found = list(
            tqdm(
                pool.map(one, range(len(test))),
                total=len(test),
                desc="POST /detect",
                unit="scene",
                disable=None,
            )
        )
    result = mean_average_precision(
        found, list(zip(test.boxes, test.classes, strict=True)), len(FASHION_MNIST_LABELS)
    )
    return {
        "scenes": len(test),
        "objects": int(sum(len(b) for b in test.boxes)),
        "map50": result.map50,
        "map50_95": result.map50_95,
        "per_class_ap50": dict(zip(FASHION_MNIST_LABELS, result.per_class50, strict=True)),
    }


def evaluate_verify(
    url: str, model: str | None, pairs: int, workers: int, out: Path | None
) -> dict:
    test = load_fashion_mnist("test")
    result: dict = {}
    for name, classes in (("unseen", UNSEEN), ("seen", SEEN)):
        idx = np.flatnonzero(np.isin(test.labels, classes))
        chosen, same = verification_pairs(test.labels[idx], pairs, seed=2)
        params = {"model": model} if model else {}

        def one(pair: np.ndarray, idx: np.ndarray = idx, params: dict = params) -> dict:
            a, b = (_png(test.images[idx[k]]) for k in pair)
            resp = httpx.post(
                f"{url}/verify",
                params=params,
                timeout=60,
                files=[("a", ("a.png", a)), ("b", ("b.png", b))],
            )
            resp.raise_for_status()
            return resp.json()

        with ThreadPoolExecutor(workers) as pool:
            answers = list(
                tqdm(
                    pool.map(one, chosen),
                    total=len(chosen),
                    desc=f"POST /verify ({name})",
                    unit="pair",
                    disable=None,
                )
            )
        distances = np.array([answer["distance"] for answer in answers])
        said = np.array([answer["same"] for answer in answers])
        result[name] = {
            "pairs": len(chosen),
            "roc_auc": roc_auc(-distances, same),
            "accuracy_at_threshold": float((said == same).mean()),
        }
        if name == "unseen":  # where the unseen classes are confused: 3 x 3 kinds of pair
            pair_classes = test.labels[idx][chosen]  # P x 2
            names = {c: FASHION_MNIST_LABELS[c] for c in pair_classes.flatten().tolist()}
            table = roc_auc_by_kind(distances, pair_classes, names)
            result[name]["roc_auc_by_kind"] = {  # null where too few pairs had that kind
                same: {kind: None if np.isnan(v) else v for kind, v in row.items()}
                for same, row in table.items()
            }
            if out is not None:
                from convserve.models.plots import plot_pair_distances

                plot_pair_distances(
                    distances, pair_classes, names, answers[0]["threshold"],
                    out.parent / "distances.png",
                    "Unseen test pairs through POST /verify: distance per kind of pair",
                )  # fmt: skip
    return result


STYLE_PHOTOS = ("chelsea.png", "coffee.png", "astronaut.png")
STYLES = ("0", "4", "9", "13", "18", "25", "4:0.5,18:0.5")


def evaluate_stylize(url: str, model: str | None, out: Path | None) -> dict:
    import time

    from convserve.models.data import load_photos

    params = {"model": model} if model else {}
    photos = {name: load_photos((name,), size=(256, 256))[0] for name in STYLE_PHOTOS}

    def stylize(image: np.ndarray, style: str) -> tuple[np.ndarray, float]:
        t0 = time.perf_counter()
        resp = httpx.post(f"{url}/stylize", params={**params, "style": style}, timeout=120,
                          files=[("images", ("photo.png", _png(image)))])  # fmt: skip
        resp.raise_for_status()
        elapsed = time.perf_counter() - t0
        return np.asarray(Image.open(io.BytesIO(resp.content)).convert("RGB")), elapsed

    grid = [[stylize(img, style)[0] for style in STYLES] for img in photos.values()]
    timings = {}
    (big,) = load_photos(("astronaut.png",), size=None)  # 512 x 512
    for side in (256, 512, 1024):
        scaled = np.asarray(Image.fromarray(big).resize((side, side), Image.Resampling.BILINEAR))
        timings[f"{side}px_ms"] = 1000 * float(
            np.median([stylize(scaled, "0")[1] for _ in range(3)])
        )
    if out is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(len(grid), len(STYLES) + 1, figsize=(2 * (len(STYLES) + 1), 6.3))
        for row, (name, image) in zip(axes, photos.items(), strict=True):
            for ax, picture, title in zip(
                row, [image, *grid[list(photos).index(name)]], ["upload", *STYLES], strict=True
            ):
                ax.imshow(picture)
                ax.set_title(title if name == STYLE_PHOTOS[0] else "", fontsize=9)
                ax.axis("off")
        fig.suptitle("POST /stylize?style=K: 256 px uploads, styles and a blend", fontsize=10)
        fig.tight_layout()
        fig.savefig(out.parent / "styles.png", dpi=80)
        plt.close(fig)
    return {"styles": list(STYLES), "photos": list(STYLE_PHOTOS), "one_request": timings}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0] if __doc__ else None)
    parser.add_argument("what", choices=["detect", "verify", "stylize"])
    parser.add_argument("--url", default="http://127.0.0.1:3000")
    parser.add_argument("--model", help="default: the server's first model of the task")
    parser.add_argument("--scenes", type=int, default=TEST_SCENES)
    parser.add_argument("--pairs", type=int, default=3000)
    parser.add_argument("--workers", type=int, default=4, help="requests in flight")
    parser.add_argument("--out", help="write the summary here (JSON)")
    args = parser.parse_args(argv)
    url = args.url.rstrip("/")
    out = Path(args.out) if args.out else None
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
    if args.what == "detect":
        result = evaluate_detect(url, args.model, args.scenes, args.workers)
    elif args.what == "verify":
        result = evaluate_verify(url, args.model, args.pairs, args.workers, out)
    else:
        result = evaluate_stylize(url, args.model, out)
    text = json.dumps(result, indent=2)
    if out:
        out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

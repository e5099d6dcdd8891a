"""What the benchmark runs and what it is held to, in one table each: the servers (convserve and
its peers, each tuned as its documentation recommends), the scenarios (a server, a Locust user,
the user counts, a model), and the goals (ratios measured side by side in one run).

Each peer is compared with convserve on the request shape its users send: a multipart upload
for the FastAPI, LitServe, BentoML and Ray Serve servers, the raw image as the body for
TorchServe, a KServe v2 BYTES tensor for Triton; convserve answers all three.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from convserve.defaults import SERVICE
from convserve.loadtest.processes import PY, Server

PEERS = "convserve.loadtest.peers"
MULTIPART, RAW, OIP = "multipart", "raw image body", "KServe v2 BYTES"


@dataclass(frozen=True)
class Scenario:
    name: str  # the row's name in the report (the goals find rows by it)
    server: str  # a key of `servers()`
    user_class: str  # the locustfile's user
    users: tuple[int, ...]
    images_per_request: int = 1
    model: str = "lenet5"  # which prepared model files the server gets
    shape: str = MULTIPART  # how the request carries its images
    locust_env: dict[str, str] = field(default_factory=dict)
    # Reported against the in-process limit of its model: "one" (one request end to end, one at
    # a time), "batch" (the model alone at its best batch), or "" (not compared).
    against: str = ""  # or "phone": CPU per photo against the phone limit (loadtest/inprocess.py)


def _uvicorn(app: str) -> list[str]:
    """A FastAPI or ASGI peer as its documentation runs it: one uvicorn worker, no access log
    (uvicorn takes uvloop and httptools when installed, as here)."""
    return [
        PY,
        "-m",
        "uvicorn",
        app,
        "--port",
        "{port}",
        "--workers",
        "1",
        "--log-level",
        "warning",
        "--no-access-log",
    ]


def servers(threads: int, peer_python: Callable[[str], str]) -> dict[str, Server]:
    """`peer_python(name)`: the interpreter of a peer that needs an environment of its own."""
    # gRPC off: these runs are HTTP, and a server of the user's may hold the default port.
    conv_env = {"CONVSERVE_INTRA_OP_THREADS": str(threads), "CONVSERVE_WARMUP_REQUESTS": "12",
                "CONVSERVE_GRPC_PORT": "0"}  # fmt: skip
    peer_env = {"PEER_THREADS": str(threads)}
    bentoml = [PY, "-m", "bentoml", "serve"]
    table = [
        Server(
            "convserve",
            [*bentoml, SERVICE, "--port", "{port}"],
            "/readyz",
            conv_env,
            "defaults: adaptive batching by images (max 128, no queue delay, 2 s budget), "
            "raw ASGI inference routes, warm-up, no access log",
        ),
        Server(
            "convserve-nobatch",
            [*bentoml, SERVICE, "--port", "{port}"],
            "/readyz",
            {**conv_env, "CONVSERVE_MAX_BATCH_SIZE": "1"},
            "adaptive batching off (max 1)",
        ),
        Server(
            "fastapi-lean",
            _uvicorn(f"{PEERS}.fastapi_lean:app"),
            "/health",
            peer_env,
            "the server users write (headline peer): one async route taking UploadFile, "
            "Pillow open/convert/resize, numpy normalization, one ORT call per request",
        ),
        Server(
            "fastapi-ort",
            _uvicorn(f"{PEERS}.fastapi_ort:app"),
            "/health",
            peer_env,
            "the lean FastAPI server with convserve's preprocessing in place of its own",
        ),
        Server(
            "floor",
            _uvicorn(f"{PEERS}.floor_asgi:app"),
            "/health",
            peer_env,
            "the floor: raw ASGI on uvicorn, the form cut by hand, the same Pillow decode, "
            "one ORT call per request, no framework, no checks",
        ),
        Server(
            "fastapi-torch",
            _uvicorn(f"{PEERS}.fastapi_torch:app"),
            "/health",
            peer_env,
            "FastAPI sync endpoint (thread pool), TorchScript, torch.inference_mode",
        ),
        Server(
            "bentoml-torch",
            [*bentoml, f"{PEERS}.bentoml_torch:TorchClassifier", "--port", "{port}"],
            "/readyz",
            peer_env,
            "plain BentoML: batchable API (max batch 128, max latency 2 s), TorchScript",
        ),
        Server(
            "litserve-ort",
            [PY, "-m", f"{PEERS}.litserve_ort", "--port", "{port}"],
            "/health",
            peer_env,
            "LitServe: LitAPI with batching (max batch 64, 5 ms)",
        ),
        Server(
            "triton",
            [peer_python("triton"), "loadtest/peers/triton_ort.py", "--port", "{port}"],
            # the model's own readiness: the server's comes before its Python model has loaded
            "/v2/models/lenet5/ready",
            peer_env,
            "Triton 2.51 (nvidia-pytriton 0.7): Python model with ORT, dynamic batcher "
            "(max batch 128, 100 µs queue delay)",
        ),
        Server(
            "torchserve",
            [peer_python("torchserve"), "loadtest/peers/torchserve/serve.py", "{port}"],
            "/ping",
            peer_env,
            "TorchServe 0.12 (Java 17): custom handler, TorchScript, batchSize 64, "
            "maxBatchDelay 5 ms, one worker",
        ),
        Server(
            "rayserve",
            [peer_python("rayserve"), "loadtest/peers/rayserve_ort.py", "--port", "{port}"],
            "/health",
            peer_env,
            "Ray Serve: one deployment with ORT, @serve.batch (max 64, 5 ms), HTTP proxy",
        ),
    ]
    return {s.name: s for s in table}


SINGLE = "lenet5 single image"
SINGLE_RAW = "lenet5 single image, raw body"
SINGLE_OIP = "lenet5 single image, KServe v2"
MULTI = "lenet5 32 images per request"
RESNET_MULTI = "resnet20 32 images per request"
LITE0_ONE = "efficientnet-lite0 one JPEG per request"
LITE0_MANY = "efficientnet-lite0 16 JPEGs per request"
DETECT = "fashion-detector one 128 px PNG scene per request"
VERIFY = "fashion-siamese /verify, two PNGs per request"
STYLIZE = "multistyle26 one 256 px JPEG per request"
PHONE_ONE = "efficientnet-lite0 one 12 MP phone JPEG per request"
PHONE_FOUR = "efficientnet-lite0 4 12 MP phone JPEGs per request"
PHONE = (PHONE_ONE, PHONE_FOUR)
USERS = (1, 8, 32, 64)
# The task models come from the user's store (`make models`); the bench copies them.
TASK_MODELS = {
    "fashion-detector": "fashion-detector",
    "fashion-siamese": "fashion-siamese",
    "multistyle26": "styletransfer-multistyle26",
}
# Peers on the multipart shape, convserve first; the raw and v2 shapes each have their own.
MULTIPART_SERVERS = (
    "convserve",
    "fastapi-lean",
    "fastapi-ort",
    "floor",
    "fastapi-torch",
    "bentoml-torch",
    "litserve-ort",
    "rayserve",
)
RAW_ENV = {"CONVSERVE_LOCUST_PATH": "/classify?top_k=1"}
TORCHSERVE_ENV = {"CONVSERVE_LOCUST_PATH": "/predictions/lenet5"}
PHONE_USERS = (8,)
# Phone photos: each peer on the request shape its users send (convserve answers all three).
PHONE_SHAPES = {
    "convserve": ("PhoneUser", MULTIPART, {}),
    "fastapi-lean": ("PhoneUser", MULTIPART, {}),
    "triton": ("PhoneOipUser", OIP, {"CONVSERVE_LOCUST_V2_MODEL": "lenet5"}),
    "torchserve": ("PhoneRawUser", RAW, TORCHSERVE_ENV),
}


def phone_scenarios() -> list[Scenario]:
    """12 MP phone JPEGs to EfficientNet-Lite0: one per request to every peer, four per request
    to those whose request carries several (TorchServe's raw body carries one)."""
    out = []
    for name, per_request in ((PHONE_ONE, 1), (PHONE_FOUR, 4)):
        for server, (user, shape, env) in PHONE_SHAPES.items():
            if per_request > 1 and shape == RAW:
                continue
            locust_env = {**env, "CONVSERVE_LOCUST_PHOTOS": str(per_request)}
            out.append(
                Scenario(
                    name,
                    server,
                    user,
                    PHONE_USERS,
                    per_request,
                    "efficientnet-lite0",
                    shape,
                    locust_env,
                    against="phone",
                )  # fmt: skip
            )
    return out


def scenarios(quick: bool) -> list[Scenario]:
    if quick:
        return [Scenario(SINGLE, "convserve", "SingleImageUser", (1, 8))]
    return [
        *(Scenario(SINGLE, s, "SingleImageUser", USERS) for s in MULTIPART_SERVERS),
        Scenario(SINGLE_RAW, "convserve", "RawImageUser", USERS, shape=RAW, locust_env=RAW_ENV),
        Scenario(
            SINGLE_RAW, "torchserve", "RawImageUser", USERS, shape=RAW, locust_env=TORCHSERVE_ENV
        ),
        Scenario(SINGLE_OIP, "convserve", "OipImageUser", USERS, shape=OIP),
        Scenario(
            SINGLE_OIP,
            "triton",
            "OipImageUser",
            USERS,
            shape=OIP,
            locust_env={"CONVSERVE_LOCUST_V2_MODEL": "lenet5"},
        ),
        Scenario(SINGLE, "convserve-nobatch", "SingleImageUser", (1, 64)),
        Scenario(MULTI, "convserve", "MultiImageUser", (8,), 32),
        Scenario("resnet20 at saturation", "convserve", "SingleImageUser", (64,), 1, "resnet20"),
        Scenario(RESNET_MULTI, "convserve", "MultiImageUser", (8,), 32, "resnet20"),
        Scenario(
            "resnet20 int8 32 images per request",
            "convserve",
            "MultiImageUser",
            (8,),
            32,
            "resnet20-int8",
        ),
        Scenario(
            LITE0_ONE, "convserve", "PhotoUser", (4, 16), 1, "efficientnet-lite0", against="one"
        ),
        Scenario(
            LITE0_MANY,
            "convserve",
            "PhotoUser",
            (4,),
            16,
            "efficientnet-lite0",
            locust_env={"CONVSERVE_LOCUST_PHOTOS": "16"},
            against="batch",
        ),
        Scenario(
            DETECT,
            "convserve",
            "DetectUser",
            (1, 8, 32),
            model="fashion-detector",
            locust_env={"CONVSERVE_LOCUST_TASK": "detect"},
            against="one",
        ),
        Scenario(
            VERIFY,
            "convserve",
            "VerifyUser",
            (1, 8, 32),
            2,
            "fashion-siamese",
            locust_env={"CONVSERVE_LOCUST_TASK": "verify"},
            against="one",
        ),
        Scenario(
            STYLIZE,
            "convserve",
            "StylizeUser",
            (1, 4),
            model="multistyle26",
            locust_env={"CONVSERVE_LOCUST_TASK": "stylize"},
            against="one",
        ),
        *phone_scenarios(),
    ]


# The goals' thresholds (loadtest/report.py measures each from one run).
GOALS = {
    "work_per_cpu_vs_lean_64": 2.0,  # requests per server-CPU-second, ÷ fastapi-lean's, 64 users
    "work_per_cpu_vs_lean_32": 1.5,  # the same at 32 users
    "cpu_vs_floor_64": 1.3,  # server CPU per request ÷ the floor's, 64 users (at most)
    "p99_over_p50_64": 3.0,  # p99 ÷ p50 at 64 users (at most)
    "resnet_served_over_limit": 0.90,  # ResNet-20, 32 images per request, ÷ in-process (at least)
    "phone_work_per_cpu_vs_lean": 4.0,  # 12 MP JPEGs per server-CPU-second ÷ fastapi-lean's
    "phone_cpu_vs_limit": 1.2,  # server CPU per 12 MP JPEG ÷ the in-process limit's (at most)
}
AHEAD_AT = (8, 32, 64)  # user counts at which convserve must be ahead of every peer (req/s)


def goal_row(name: str, target: str, value: str, met: bool | None) -> str:
    """One goal as a row of the report's goals table; None: it was not measured."""
    verdict = "not measured" if met is None else ("met" if met else "**missed**")
    return f"| {name} | {target} | {value} | {verdict} |"

"""Deployment artefacts: Dockerfile lint, Kubernetes manifests, compose file, and the CPU image
itself built with buildah, run, and asked to classify a real image."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml
from PIL import Image
from serving import free_port, wait_ready

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
BIN = Path(os.environ.get("VIRTUAL_ENV", ROOT / ".venv")) / "bin"
BUILDAH = ["buildah", "--storage-driver", "vfs"]
BASE_TAG = "localhost/debian:bookworm-slim"
IMAGE_TAG = "localhost/convserve:test"
DEFAULT_TAG = "localhost/convserve:default-test"
WHEELS = Path("/opt/wheels")


def _tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(str(BIN / name))
    assert found, f"{name} is not installed (make test installs it)"
    return found


def test_dockerfile_lints_clean():
    result = subprocess.run(
        [_tool("hadolint"), "Dockerfile"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_kubernetes_manifests_validate_strictly():
    manifests = sorted(str(p) for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    result = subprocess.run(
        [_tool("kubernetes-validate"), "--strict", *manifests], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    kinds = {yaml.safe_load(Path(m).read_text())["kind"] for m in manifests}
    assert kinds == {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"}
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(Path(m).name for m in manifests)


def test_deployment_is_hardened_and_probed():
    deployment = yaml.safe_load((K8S / "deployment.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert {"cpu", "memory"} <= set(container["resources"]["limits"])
    assert pod["terminationGracePeriodSeconds"] >= 10
    # Threads per pod follow the CPU limit, not the node's cores.
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["CONVSERVE_INTRA_OP_THREADS"] == str(container["resources"]["limits"]["cpu"])
    assert any(m["mountPath"] == "/tmp" for m in container["volumeMounts"])


def test_the_grace_period_covers_prestop_drain_and_the_longest_request():
    from convserve.service.settings import ServiceSettings

    pod = yaml.safe_load((K8S / "deployment.yaml").read_text())["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    settings = ServiceSettings(
        **{k.removeprefix("CONVSERVE_").lower(): v for k, v in env.items()}, models=["m:v"]
    )
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    longest_request = settings.body_timeout_s + settings.request_timeout_ms / 1000
    needed = pre_stop + settings.drain_s + longest_request
    assert settings.drain_s > 0 and pre_stop > 0
    assert pod["terminationGracePeriodSeconds"] >= needed + 5, (needed, pod)
    # The memory limit holds the bodies admitted at once and the decodes running at once.
    limit = container["resources"]["limits"]["memory"]
    assert limit.endswith("Gi")
    worst_decode = 16 * settings.max_image_pixels  # RGBA plus its composite, bytes
    # The two default models served and warm, the supervisor included: 531 MiB measured, 567 MiB
    # after 32 requests of 16 photos to EfficientNet-Lite0 (batches of at most 17 at 224 px).
    serving = 600 * 2**20
    budget = serving + settings.max_held_bytes + settings.decode_threads * worst_decode
    assert budget < int(limit[:-2]) * 2**30


def test_compose_runs_the_service_and_locust():
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    assert {"convserve", "locust-master", "locust-worker"} <= set(services)
    assert services["convserve"]["read_only"] is True
    assert "--master" in services["locust-master"]["command"]
    assert "--worker" in services["locust-worker"]["command"]


# --- the image ---------------------------------------------------------------------------------


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def _ensure_base_image() -> None:
    """A local equivalent of debian:bookworm-slim (no registry is reachable): a minbase
    debootstrap, slimmed as the official slim image is (no docs, man pages, locales, apt cache)."""
    images = _run([*BUILDAH, "images", "--format", "{{.Name}}:{{.Tag}}"]).stdout
    if BASE_TAG in images:
        return
    rootfs = Path("/tmp/convserve-rootfs")
    shutil.rmtree(rootfs, ignore_errors=True)
    _run(["debootstrap", "--variant=minbase", "bookworm", str(rootfs)])
    for pattern in (
        "usr/share/doc/*",
        "usr/share/man/*",
        "usr/share/locale/*",
        "usr/share/info/*",
        "var/cache/apt/archives/*.deb",
        "var/lib/apt/lists/*",
    ):
        for path in rootfs.glob(pattern):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    (rootfs / "etc/dpkg/dpkg.cfg.d/slim").write_text(
        "path-exclude /usr/share/doc/*\npath-exclude /usr/share/man/*\n"
        "path-exclude /usr/share/locale/*\npath-exclude /usr/share/info/*\n"
    )
    (rootfs / "etc/apt/apt.conf.d/docker-clean").write_text(
        'DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb || true"; };\n'
    )
    container = _run([*BUILDAH, "from", "scratch"]).stdout.strip()
    _run([*BUILDAH, "copy", container, str(rootfs), "/"])
    _run([*BUILDAH, "commit", "--rm", container, BASE_TAG])
    shutil.rmtree(rootfs, ignore_errors=True)


def _build(tag: str, work: Path, *build_args: str) -> None:
    """`buildah bud` of the Dockerfile on the local Debian base, with the host's CA bundle and
    its local wheels (the CPU build of torch) mounted for pip, as ../container-build.md says.
    `--layers` keeps the stages two builds share (base, sources, serving venv)."""
    (work / "ca").mkdir(exist_ok=True)
    shutil.copyfile("/etc/ssl/certs/ca-certificates.crt", work / "ca" / "ca.crt")
    mounts = ["-v", f"{work / 'ca'}:/run/hostca:ro", "-v", f"{work / 'pip.conf'}:/etc/pip.conf:ro"]
    conf = "[global]\ncert = /run/hostca/ca.crt\n"
    if WHEELS.is_dir():
        mounts += ["-v", f"{WHEELS}:/run/wheels:ro"]
        conf += "find-links = /run/wheels\n"
    (work / "pip.conf").write_text(conf)
    t0 = time.monotonic()
    _run(
        [*BUILDAH, "bud", "--layers", "--isolation", "chroot", "--format", "docker", *mounts,
         "--build-arg", f"BASE_IMAGE={BASE_TAG}", *build_args, "-t", tag, "."],
        cwd=ROOT,
    )  # fmt: skip
    print(f"{tag} built in {time.monotonic() - t0:.0f} s")


@pytest.fixture(scope="module")
def builder(tmp_path_factory):
    _tool("buildah")
    _tool("debootstrap")
    _ensure_base_image()
    yield tmp_path_factory.mktemp("buildah")
    subprocess.run([*BUILDAH, "rmi", "--force", IMAGE_TAG, DEFAULT_TAG], capture_output=True)
    subprocess.run([*BUILDAH, "rmi", "--prune"], capture_output=True)


def _readme_container_recipe() -> tuple[str, list[str]]:
    """The README's recipe for an image of the local store's models: its copy command, and its
    `docker build` line's arguments."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Container image", 1)[1].split("```bash", 1)[1].split("```")[0]
    lines = [line for line in section.splitlines() if line and not line.startswith("#")]
    copy = next(line for line in lines if line.startswith("mkdir -p build/store"))
    build = next(line for line in lines if "MODEL_SOURCE=dir" in line).split()
    assert build[:2] == ["docker", "build"] and build[-3:-1] == ["-t", "convserve"], build
    return copy, build[2:-3]


@pytest.fixture(scope="module")
def image(builder, default_stored, imagenet_stored, bentoml_home):
    """The CPU image built as the README says: its copy of the local store's models into
    build/store (the test session's store standing for ~/bentoml), then its `docker build`
    arguments (buildah standing for Docker)."""
    copy, build_args = _readme_container_recipe()
    store = ROOT / "build" / "store"
    shutil.rmtree(store, ignore_errors=True)
    subprocess.run(["bash", "-c", copy.replace("~/bentoml", str(bentoml_home))], cwd=ROOT,
                   check=True)  # fmt: skip
    _build(IMAGE_TAG, builder, *build_args)
    yield IMAGE_TAG
    shutil.rmtree(store, ignore_errors=True)


@pytest.fixture(scope="module")
def default_image(builder):
    """`docker build .` as a user runs it: MODEL_SOURCE=train, the model trained in the build.
    Shortened by TRAIN_ARGS (the path is the same); torch from the local wheels, not an index."""
    assert WHEELS.is_dir(), f"the CPU torch wheel is expected in {WHEELS}"
    _build(DEFAULT_TAG, builder, "--build-arg", "TORCH_INDEX=",
           "--build-arg", "TRAIN_ARGS=--epochs 1 --train-limit 6000 --test-limit 1000")  # fmt: skip
    return DEFAULT_TAG


@contextlib.contextmanager
def _serving(image: str):
    """The image's own CMD on a free port; only /tmp writable. Yields the base URL."""
    config = json.loads(_run([*BUILDAH, "inspect", image]).stdout)["Docker"]["config"]
    cmd = config["Cmd"]
    port = free_port()
    command = [*cmd[:-1], str(port)] if cmd[-2] == "--port" else cmd
    container = _run([*BUILDAH, "from", image]).stdout.strip()
    log_path = ROOT / "build" / "container-run.log"
    log = open(log_path, "wb")  # noqa: SIM115 - closed below
    t0 = time.monotonic()
    server = subprocess.Popen(
        [*BUILDAH, "run", "--isolation", "chroot", "--mount", "type=tmpfs,destination=/tmp",
         container, "--", *command],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(server, url, log_path)
        print(f"container ready {time.monotonic() - t0:.1f} s after start")
        yield url
    finally:
        # The container's processes are not in buildah's process group: stop them by name.
        _stop(list(_serving_processes()))
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()
        subprocess.run([*BUILDAH, "rm", container], capture_output=True)


def _boot_png(fashion_test) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(fashion_test.images[0]).save(buf, "PNG")
    return buf.getvalue()


def _serving_processes() -> dict[int, int]:
    """pid -> uid of the server processes inside a container: with chroot isolation they are
    host processes whose root directory is the container's file system."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            status = (proc / "status").read_text()
        except OSError:
            continue
        if b"convserve.service.app:Classifier" not in cmdline or cmdline[0].endswith(b"buildah"):
            continue
        with contextlib.suppress(OSError):
            if os.readlink(proc / "root") == "/":
                continue
            uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
            found[int(proc.name)] = int(uid_line.split()[1])
    return found


def _stop(pids: list[int]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
            time.sleep(0.2)


@pytest.mark.slow
def test_image_is_lean_non_root_and_serves(image, fashion_test, photos):
    info = json.loads(_run([*BUILDAH, "inspect", image]).stdout)
    config = info["Docker"]["config"]
    assert config["User"] not in ("", "0", "root")
    assert config["Healthcheck"]["Test"][0] == "CMD"
    cmd = config["Cmd"]
    assert cmd[:3] == ["bentoml", "serve", "convserve.service.app:Classifier"]  # exec form
    listing = _run([*BUILDAH, "images", "--json", image]).stdout
    value, unit = json.loads(listing)[0]["size"].split()  # e.g. "431 MB"
    size_mb = float(value) * {"kB": 1e-3, "MB": 1.0, "GB": 1e3}[unit]
    print(f"image size {size_mb:.0f} MB")
    assert size_mb <= 600

    with _serving(image) as url:
        resp = httpx.post(
            f"{url}/classify", files=[("images", ("boot.png", _boot_png(fashion_test)))]
        )
        assert resp.status_code == 200, resp.text
        assert resp.json()["results"][0]["predictions"][0]["label"] == "Ankle boot"
        _answers_a_real_photo(url, photos)
        # The demo page and the Swagger UI assets ship inside the image (package data).
        page = httpx.get(f"{url}/")
        assert page.status_code == 200 and "<title>convserve</title>" in page.text
        bundle = httpx.get(f"{url}/static/swagger-ui/swagger-ui-bundle.js")
        assert bundle.status_code == 200 and len(bundle.content) > 500_000
        uids = set(_serving_processes().values())
        assert uids and 0 not in uids, uids
        ready = (ROOT / "build" / "container-run.log").read_text()
        assert "event loop uvloop" in ready and "HTTP httptools" in ready, ready[-2000:]


def _answers_a_real_photo(url: str, photos: dict[str, bytes]) -> None:
    """The ImageNet model in the image classifies scikit-image's cat as a cat."""
    files = [("images", ("chelsea.png", photos["chelsea.png"]))]
    params = {"model": "imagenet-efficientnet-lite0"}
    resp = httpx.post(f"{url}/classify", params=params, files=files, timeout=60)
    assert resp.status_code == 200, resp.text
    assert resp.json()["results"][0]["predictions"][0]["label"] in CATS


CATS = {"Egyptian Mau", "tabby cat", "a cat having a striped coat"}


# The second way to build (no store given: the build trains the default model) takes five
# minutes more; `make test-long` runs it, the default run builds from a store.
@pytest.mark.slow
@pytest.mark.long
def test_default_build_trains_its_model_and_serves_it(default_image, fashion_test, photos):
    with _serving(default_image) as url:
        models = httpx.get(f"{url}/models").json()
        names = [m["name"] for m in models["models"]]
        assert names == ["fashion-lenet5", "imagenet-efficientnet-lite0"]
        _answers_a_real_photo(url, photos)
        (version,) = models["models"][0]["versions"]
        assert version["tag"].startswith("fashion-lenet5:") and version["architecture"] == "lenet5"
        resp = httpx.post(
            f"{url}/classify", files=[("images", ("boot.png", _boot_png(fashion_test)))]
        )
        assert resp.status_code == 200, resp.text
        assert resp.json()["results"][0]["predictions"][0]["label"] in version["labels"]

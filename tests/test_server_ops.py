"""Operating the server: reloads under load, broken versions, health, graceful shutdown, auth, TLS, CLI."""

import datetime
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from core import contract as c
from serving.proto.cyborg.v1 import detector_pb2 as pb
from serving.proto.cyborg.v1 import detector_pb2_grpc as pb_grpc
from tests.serving_fixtures import RunningServer, build_model_repository, random_images, reference_outputs, write_model_version

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def tensor_request(image, **fields) -> pb.DetectRequest:
    return pb.DetectRequest(tensor=pb.Tensor(shape=image.shape, data=image.tobytes()), **fields)


def health_of(channel, service: str = "") -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_reload_under_load_has_no_failed_requests(tmp_path):
    build_model_repository(tmp_path, versions=(1,))
    images = random_images(8, seed=5)
    scores = {v: reference_outputs(write_model_version(tmp_path / "ref", "tiny", v), images)["score"] for v in (1, 2)}
    answers, errors = [], []
    stop = threading.Event()

    def client(index: int, address: str) -> None:
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.DetectorStub(channel)
            while not stop.is_set():
                try:
                    answer = stub.Detect(tensor_request(images[index]), timeout=10)
                    answers.append((index, answer.version, answer.score, time.monotonic()))
                except grpc.RpcError as error:
                    errors.append(error)

    with RunningServer(tmp_path, poll_seconds=0.2) as server:
        threads = [threading.Thread(target=client, args=(i, server.address)) for i in range(8)]
        for thread in threads:
            thread.start()
        time.sleep(0.5)
        write_model_version(tmp_path, "tiny", 2)  # picked up by polling while clients run
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any(v == 2 for _, v, _, _ in answers[-8:]):
            time.sleep(0.1)
        time.sleep(0.5)
        stop.set()
        for thread in threads:
            thread.join()
        statuses = server.call(_statuses, server)

    assert not errors, errors[:3]
    versions = [v for _, v, _, _ in answers]
    assert versions.count(1) > 10 and versions.count(2) > 10
    last = {index: version for index, version, _, _ in answers}  # answers are in time order
    assert set(last.values()) == {2}  # every client ends on v2: v1 is gone after the swap
    for index, version, score, _ in answers:
        assert score == pytest.approx(float(scores[version][index]), abs=1e-6)
    assert statuses == [(2, "READY"), (1, "UNLOADED")]


async def _pending(server):
    return server.server.repository.get().batcher.pending


async def _statuses(server):
    return [(s.version, s.state) for s in server.server.repository.statuses()]


def test_broken_version_leaves_old_serving_and_health_follows_models(tmp_path):
    (tmp_path / "placeholder").mkdir()  # an empty repository to begin with
    with RunningServer(tmp_path) as server, grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.DetectorStub(channel)
        assert health_of(channel) == NOT_SERVING  # nothing loaded
        with pytest.raises(grpc.RpcError) as raised:
            stub.Detect(tensor_request(random_images(1)[0]))
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND

        build_model_repository(tmp_path, versions=(1,))
        folder = write_model_version(tmp_path, "tiny", 2)
        (folder / c.ONNX_FILE).write_bytes(b"\0" * 64)  # checksum no longer matches
        write_model_version(tmp_path, "other", 1)
        (tmp_path / "other" / "1" / c.CONTRACT_FILE).write_text("{}")  # bad model.json
        report = server.call(server.server.repository.reload)
        assert report.loaded == [("tiny", 1)] and sorted((n, v) for n, v, _ in report.failed) == [("other", 1), ("tiny", 2)]
        assert stub.Detect(tensor_request(random_images(1)[0])).version == 1
        assert health_of(channel) == SERVING and health_of(channel, "tiny") == SERVING
        assert health_of(channel, "other") == NOT_SERVING
        with pytest.raises(grpc.RpcError) as raised:
            stub.Detect(tensor_request(random_images(1)[0], model="other"))
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE and "model.json" in raised.value.details()
        failures = server.server.metrics.registry.get_sample_value("cyborg_model_load_failure_total", {"model": "tiny", "version": "2"})
        assert failures == 1

        import shutil

        shutil.rmtree(tmp_path / "tiny")  # the model leaves the repository
        report = server.call(server.server.repository.reload)
        assert report.unloaded == [("tiny", 1)]
        assert health_of(channel, "tiny") == NOT_SERVING and health_of(channel) == NOT_SERVING


def test_graceful_shutdown_lets_in_flight_requests_finish(tmp_path):
    build_model_repository(tmp_path)
    server = RunningServer(tmp_path, max_queue_delay_ms=1500).start()  # a lone request waits 1.5 s in the queue
    results, watched = {}, []
    channel = grpc.insecure_channel(server.address)
    stub = pb_grpc.DetectorStub(channel)
    assert health_of(channel) == SERVING
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))

    def in_flight():
        try:
            results["answer"] = stub.Detect(tensor_request(random_images(1)[0]), timeout=20)
        except grpc.RpcError as error:
            results["error"] = error

    def follow():
        try:
            for update in watch:
                watched.append(update.status)  # the server ends the watch after NOT_SERVING
        except grpc.RpcError:
            pass

    threads = [threading.Thread(target=in_flight), threading.Thread(target=follow)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 10
    while server.call(_pending, server) == 0 and time.monotonic() < deadline:
        time.sleep(0.02)  # until the request waits in the batch queue
    started = time.monotonic()
    server.stop(grace=10)
    threads[0].join(15)
    assert "error" not in results and results["answer"].version == 1
    assert time.monotonic() - started < 8  # stopping waited for the request, not the whole grace
    threads[1].join(5)
    assert not threads[1].is_alive() and watched == [SERVING, NOT_SERVING]
    with pytest.raises(grpc.RpcError) as raised:
        stub.Detect(tensor_request(random_images(1)[0]), timeout=2)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    channel.close()


def test_bearer_token_auth(tmp_path):
    build_model_repository(tmp_path / "repo")
    (tmp_path / "tokens").write_text("# accepted tokens\nsecret-one\nsecret-two\n")
    image = random_images(1)[0]
    with RunningServer(tmp_path / "repo", auth_token_file=str(tmp_path / "tokens")) as server, grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.DetectorStub(channel)
        for metadata, problem in [(None, "missing"), ((("authorization", "Bearer wrong"),), "invalid"), ((("authorization", "secret-one"),), "Bearer")]:
            with pytest.raises(grpc.RpcError) as raised:
                stub.Detect(tensor_request(image), metadata=metadata)
            assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED and problem in raised.value.details()
        with pytest.raises(grpc.RpcError) as raised:
            list(stub.DetectStream(iter([tensor_request(image)])))
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
        answer = stub.Detect(tensor_request(image), metadata=(("authorization", "Bearer secret-two"),))
        assert answer.version == 1
        assert health_of(channel) == SERVING  # probes need no token


def make_pki(folder):
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate (PEM files)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def certificate(name, issuer_name, issuer_key, key, ca=False, usage=None, san=None):
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if usage:
            builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    def write(name, cert, key):
        (folder / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (folder / f"{name}.key").write_bytes(
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    write("ca", certificate("cyborg test CA", "cyborg test CA", ca_key, ca_key, ca=True), ca_key)
    server_key = ec.generate_private_key(ec.SECP256R1())
    san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    write("server", certificate("localhost", "cyborg test CA", ca_key, server_key, usage=ExtendedKeyUsageOID.SERVER_AUTH, san=san), server_key)
    client_key = ec.generate_private_key(ec.SECP256R1())
    write("client", certificate("client", "cyborg test CA", ca_key, client_key, usage=ExtendedKeyUsageOID.CLIENT_AUTH), client_key)
    return {name: (folder / f"{name}.pem").read_bytes() for name in ("ca", "server", "client")} | {"client.key": (folder / "client.key").read_bytes()}


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mtls"])
def test_tls_and_mutual_tls(tmp_path, mutual):
    pytest.importorskip("cryptography", reason="the cryptography package generates the test certificates")
    build_model_repository(tmp_path / "repo")
    pki = make_pki(tmp_path)
    tls = dict(tls_cert=str(tmp_path / "server.pem"), tls_key=str(tmp_path / "server.key"))
    if mutual:
        tls["tls_client_ca"] = str(tmp_path / "ca.pem")
    image = random_images(1)[0]
    with RunningServer(tmp_path / "repo", **tls) as server:
        address = f"localhost:{server.port}"

        def detect(credentials):
            with grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address) as channel:
                return pb_grpc.DetectorStub(channel).Detect(tensor_request(image), timeout=5)

        with pytest.raises(grpc.RpcError) as raised:
            detect(None)  # plaintext against a TLS port
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        with_client = grpc.ssl_channel_credentials(pki["ca"], pki["client.key"], pki["client"])
        assert detect(with_client).version == 1
        server_only = grpc.ssl_channel_credentials(pki["ca"])
        if mutual:
            with pytest.raises(grpc.RpcError) as raised:
                detect(server_only)
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        else:
            assert detect(server_only).version == 1


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_cyborg_serve_command_runs_and_stops_on_sigterm(tmp_path):
    import json

    build_model_repository(tmp_path)
    port = free_port()
    command = [sys.executable, "-m", "cyborg.cli", "serve", "--model-repository", str(tmp_path), "--host", "127.0.0.1",
               "--port", str(port), "--metrics-port", "-1", "--intra-op-threads", "1", "--decode-workers", "1"]  # fmt: skip
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=60)
            deadline = time.monotonic() + 30
            while health_of(channel) != SERVING and time.monotonic() < deadline:
                time.sleep(0.1)
            assert pb_grpc.DetectorStub(channel).Detect(tensor_request(random_images(1)[0]), timeout=10).model == "tiny"
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        process.kill()
    records = [json.loads(line) for line in process.stderr.read().splitlines() if line.startswith("{")]
    messages = [r["message"] for r in records]
    assert any(m.startswith("listening on 127.0.0.1") for m in messages) and "shutting down" in messages
    assert any(r.get("port") == port for r in records)


def test_cyborg_serve_refuses_bad_settings_in_one_line(tmp_path, capsys):
    from cyborg.cli import main as cli

    build_model_repository(tmp_path / "repo")
    cases = [
        (["--model-repository", str(tmp_path / "missing")], "not a folder"),
        (["--model-repository", str(tmp_path / "repo"), "--max-batch-size", "0"], "--max-batch-size 0"),
        (["--model-repository", str(tmp_path / "repo"), "--tls-cert", str(tmp_path / "cert.pem")], "both --tls-cert and --tls-key"),
        (["--model-repository", str(tmp_path / "repo"), "--auth-token-file", str(tmp_path / "none")], "auth token file"),
        (["--model-repository", str(tmp_path / "repo"), "--version-policy", "latest:0"], "--version-policy 'latest:0': expected latest"),
        (["--model-repository", str(tmp_path / "repo"), "--version-policy", "newest"], "latest:N (the N newest that load, N >= 1), all"),
    ]
    for arguments, message in cases:
        assert cli(["serve", "--port", "0", "--metrics-port", "-1", *arguments]) == 2
        assert message in capsys.readouterr().err


def test_cyborg_serve_version_policy_flag_reaches_the_config():
    from cyborg.cli import build_parser
    from serving.commands.serve import config_from_args

    for extra, expected in (([], "latest"), (["--version-policy", "latest:2"], "latest:2"), (["--version-policy", "6,7"], "6,7")):
        argv = ["serve", *extra]
        assert config_from_args(build_parser(argv).parse_args(argv)).version_policy == expected


def test_version_policy_serves_each_loaded_version_on_every_surface(tmp_path):
    from tests.test_server import scrape

    tc = pytest.importorskip("tritonclient.grpc")
    build_model_repository(tmp_path, versions=(1, 2, 3))
    images = random_images(1, seed=3)
    scores = {v: float(reference_outputs(tmp_path / "tiny" / str(v), images)["score"][0]) for v in (2, 3)}
    with RunningServer(tmp_path, version_policy="latest:2") as server, grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.DetectorStub(channel)
        for asked, served in ((0, 3), (3, 3), (2, 2)):  # version 0: the newest loaded
            answer = stub.Detect(tensor_request(images[0], version=asked))
            assert answer.version == served and answer.score == pytest.approx(scores[served], abs=1e-5)
        with pytest.raises(grpc.RpcError) as raised:
            stub.Detect(tensor_request(images[0], version=1))
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND and "version 1 is not served (serving versions 3, 2)" in raised.value.details()

        listed = stub.ListModels(pb.ListModelsRequest())
        assert [(m.name, m.version) for m in listed.models] == [("tiny", 3), ("tiny", 2)] and listed.default_model == "tiny"
        assert [stub.GetModel(pb.GetModelRequest(model="tiny", version=v)).version for v in (0, 2)] == [3, 2]
        assert health_of(channel, "tiny") == SERVING and health_of(channel) == SERVING

        samples = scrape(server)
        labels = lambda v, *extra: tuple(sorted((("model", "tiny"), ("version", str(v)), *extra)))  # noqa: E731
        assert [samples.get(("cyborg_model_ready", labels(v))) for v in (3, 2, 1)] == [1, 1, None]
        assert [samples.get(("cyborg_inference_request_success_total", labels(v))) for v in (3, 2)] == [2, 1]

        triton = tc.InferenceServerClient(server.address)
        try:
            assert [list(triton.get_model_metadata("tiny", v).versions) for v in ("", "2")] == [["2", "3"], ["2", "3"]]
            assert [triton.is_model_ready("tiny", v) for v in ("", "3", "2", "1")] == [True, True, True, False]
            index = {(m.name, m.version): m.state for m in triton.get_model_repository_index().models}
            assert index == {("tiny", "3"): "READY", ("tiny", "2"): "READY", ("tiny", "1"): "UNLOADED"}
            request = tc.InferInput(c.INPUT_NAME, list(images.shape), "UINT8")
            request.set_data_from_numpy(images)
            result = triton.infer("tiny", [request], model_version="2")
            assert result.get_response().model_version == "2"
            assert float(result.as_numpy(c.SCORE_OUTPUT)[0]) == pytest.approx(scores[2], abs=1e-5)
        finally:
            triton.close()


def test_default_version_serves_versionless_requests_for_the_default_model(tmp_path):
    tc = pytest.importorskip("tritonclient.grpc")
    build_model_repository(tmp_path, versions=(1, 2, 3))
    build_model_repository(tmp_path, name="zeta", versions=(1, 2))
    images = random_images(1, seed=3)
    scores = {v: float(reference_outputs(tmp_path / "tiny" / str(v), images)["score"][0]) for v in (2, 3)}
    with RunningServer(tmp_path, version_policy="latest:3", default_version=2) as server, grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.DetectorStub(channel)
        for model, asked, served in (("", 0, 2), ("tiny", 0, 2), ("tiny", 3, 3), ("", 1, 1), ("zeta", 0, 2)):
            answer = stub.Detect(tensor_request(images[0], model=model, version=asked))
            assert (answer.model, answer.version) == (model or "tiny", served)
        assert stub.Detect(tensor_request(images[0])).score == pytest.approx(scores[2], abs=1e-5)
        listed = stub.ListModels(pb.ListModelsRequest())
        assert (listed.default_model, listed.default_version) == ("tiny", 2)
        assert [stub.GetModel(pb.GetModelRequest(model=m)).version for m in ("", "tiny", "zeta")] == [2, 2, 2]

        triton = tc.InferenceServerClient(server.address)
        try:
            assert list(triton.get_model_metadata("tiny").versions) == ["1", "2", "3"]
            assert triton.is_model_ready("tiny") and triton.is_model_ready("tiny", "1")
            request = tc.InferInput(c.INPUT_NAME, list(images.shape), "UINT8")
            request.set_data_from_numpy(images)
            assert triton.infer("tiny", [request]).get_response().model_version == "2"
        finally:
            triton.close()


def test_default_version_the_policy_cannot_serve_stops_the_start(tmp_path):
    from core.errors import UserError

    build_model_repository(tmp_path, versions=(1, 2))
    with pytest.raises(UserError, match=r"^--default-version 5: --version-policy 2,1 does not serve version 5"):
        RunningServer(tmp_path, version_policy="1,2", default_version=5).start()  # create_server: by the policy's form
    server = RunningServer(tmp_path, default_version=1)  # latest: only v2 loads
    try:
        with pytest.raises(UserError, match=r"^--default-version 1: model 'tiny' version 1 is not served under --version-policy latest:1 \(serving 2; the policy leaves it out\)$"):
            server.start()
    finally:
        server.stop(0)
    with RunningServer(tmp_path, version_policy="latest:2", default_version=1) as running, grpc.insecure_channel(running.address) as channel:
        assert pb_grpc.DetectorStub(channel).Detect(tensor_request(random_images(1)[0])).version == 1


def test_cyborg_serve_default_version_flag(tmp_path, capsys):
    from cyborg.cli import build_parser, main as cli
    from serving.commands.serve import config_from_args

    for extra, expected in (([], 0), (["--default-version", "2"], 2), (["--version-policy", "2,3", "--default-version", "3"], 3)):
        argv = ["serve", *extra]
        assert config_from_args(build_parser(argv).parse_args(argv)).default_version == expected
    build_model_repository(tmp_path, versions=(1, 2))
    cases = [
        (["--default-version", "-1"], "cyborg: error: --default-version -1: must not be negative"),
        (["--version-policy", "2", "--default-version", "1"], "cyborg: error: --default-version 1: --version-policy 2 does not serve version 1"),
        (["--default-version", "1"], "cyborg: error: --default-version 1: model 'tiny' version 1 is not served under --version-policy latest:1"),  # after loading
        (["--default-version", "3"], f"version 3 is not served under --version-policy latest:1 (serving 2; {tmp_path / 'tiny' / '3'} does not exist)"),
    ]
    for arguments, message in cases:
        argv = ["serve", "--model-repository", str(tmp_path), "--port", "0", "--metrics-port", "-1", "--log-format", "text", *arguments]
        assert cli(argv) == 2
        assert message in capsys.readouterr().err

"""The model repository: loading, versions, broken versions, default model, `cyborg models list`."""

import asyncio
import json

import numpy as np
import pytest

from cyborg.cli import main as cli
from core import contract as c
from core.errors import UserError
from serving.errors import ModelNotFound, ModelNotReady
from serving.metrics import Metrics
from serving.repository import ModelRepository, RepositorySettings, VersionPolicy
from tests.serving_fixtures import build_model_repository, random_images, reference_outputs, write_model_version

SETTINGS = RepositorySettings(intra_op_threads=1)


def corrupt_onnx(folder):
    """Garbage in model.onnx with a matching checksum: only loading can find it."""
    (folder / c.ONNX_FILE).write_bytes(b"not an onnx model")
    contract = c.read_contract(folder, verify=False)
    c.write_contract(folder, c.ModelContract.from_dict({**contract.to_dict(), "files": {c.ONNX_FILE: c.sha256_file(folder / c.ONNX_FILE)}}))


def failures(metrics: Metrics, name: str, version: int) -> float:
    return metrics.registry.get_sample_value("cyborg_model_load_failure_total", {"model": name, "version": str(version)}) or 0.0


def test_serves_latest_version_and_its_outputs(tmp_path):
    build_model_repository(tmp_path, versions=(1, 2))
    images = random_images(3)

    async def main():
        repository = ModelRepository(tmp_path, SETTINGS)
        report = await repository.reload()
        model = repository.get()
        result = await model.batcher.submit(images)
        states = [(s.version, s.state) for s in repository.statuses()]
        await repository.close()
        return report, model.contract.version, result, states

    report, version, result, states = asyncio.run(main())
    assert report.loaded == [("tiny", 2)] and version == 2
    expected = reference_outputs(tmp_path / "tiny" / "2", images)
    for name in c.OUTPUT_NAMES:
        np.testing.assert_allclose(result.outputs[name], expected[name], atol=1e-6)
    assert states == [(2, "READY"), (1, "UNLOADED")]


def test_new_version_replaces_old_after_loading_and_in_flight_use_finishes(tmp_path):
    build_model_repository(tmp_path, versions=(1,))

    async def main():
        repository = ModelRepository(tmp_path, SETTINGS)
        await repository.reload()
        old = repository.get()
        holder = old.use()
        holder.__enter__()  # a request still using v1
        write_model_version(tmp_path, "tiny", 2)
        reload = asyncio.ensure_future(repository.reload())
        await asyncio.sleep(0.3)
        assert repository.get().contract.version == 2  # v2 already serves new requests
        assert not reload.done()  # but v1 is not unloaded while in use
        result = await old.batcher.submit(random_images(1))  # and v1 still answers its holder
        holder.__exit__(None, None, None)
        report = await reload
        await repository.close()
        return report, result

    report, result = asyncio.run(main())
    assert report.loaded == [("tiny", 2)] and report.unloaded == [("tiny", 1)]
    assert result.outputs["score"].shape == (1,)


@pytest.mark.parametrize("breakage", ["checksum", "corrupt-onnx", "bad-json", "wrong-folder"])
def test_broken_new_version_leaves_old_serving(tmp_path, breakage):
    build_model_repository(tmp_path, versions=(1,))
    metrics = Metrics()

    async def main():
        repository = ModelRepository(tmp_path, SETTINGS, metrics)
        await repository.reload()
        folder = write_model_version(tmp_path, "tiny", 2)
        if breakage == "checksum":
            with open(folder / c.ONNX_FILE, "ab") as handle:
                handle.write(b"\0")
        elif breakage == "corrupt-onnx":
            corrupt_onnx(folder)
        elif breakage == "bad-json":
            (folder / c.CONTRACT_FILE).write_text('{"name": "tiny", "version": 2')
        else:
            folder.rename(tmp_path / "tiny" / "3")
        report = await repository.reload()
        again = await repository.reload()  # an unchanged broken version is not retried
        version = repository.get().contract.version
        states = {s.version: (s.state, s.error) for s in repository.statuses()}
        await repository.close()
        return report, again, version, states

    report, again, version, states = asyncio.run(main())
    broken = 3 if breakage == "wrong-folder" else 2
    assert version == 1
    assert [(n, v) for n, v, _ in report.failed] == [("tiny", broken)] and not again.failed
    assert states[broken][0] == "UNAVAILABLE" and states[1][0] == "READY"
    expected = {"checksum": "sha256", "corrupt-onnx": "ONNX Runtime cannot load", "bad-json": "unreadable", "wrong-folder": "sits in tiny/3"}
    assert expected[breakage] in states[broken][1]
    assert failures(metrics, "tiny", broken) == 1


def test_lookup_errors_and_default_model(tmp_path):
    build_model_repository(tmp_path, name="alpha", versions=(1,))
    build_model_repository(tmp_path, name="beta", versions=(3,))
    corrupt_onnx(write_model_version(tmp_path, "gamma", 1))
    (tmp_path / "beta" / "4").mkdir()  # an export in progress: no model.json yet

    async def main():
        repository = ModelRepository(tmp_path, SETTINGS)
        report = await repository.reload()
        try:
            assert repository.get().contract.name == "alpha"  # the first model
            assert repository.get("beta", 3).contract.version == 3
            with pytest.raises(ModelNotFound, match="unknown model 'nope'"):
                repository.get("nope")
            with pytest.raises(ModelNotFound, match=r"^model 'beta' version 9 is not served \(serving version 3\)$"):
                repository.get("beta", 9)
            with pytest.raises(ModelNotReady, match="gamma.*ONNX Runtime"):
                repository.get("gamma")
            states = {(s.name, s.version): s.state for s in repository.statuses()}
        finally:
            await repository.close()
        other = ModelRepository(tmp_path, RepositorySettings(intra_op_threads=1, default_model="beta"))
        await other.reload()
        default = other.get().contract.name
        await other.close()
        return report, states, default

    report, states, default = asyncio.run(main())
    assert sorted(report.loaded) == [("alpha", 1), ("beta", 3)]
    assert states[("beta", 4)] == "INCOMPLETE" and states[("gamma", 1)] == "UNAVAILABLE"
    assert default == "beta"


def ready(metrics: Metrics, name: str, version: int) -> float | None:
    return metrics.registry.get_sample_value("cyborg_model_ready", {"model": name, "version": str(version)})


def policy_settings(policy: str) -> RepositorySettings:
    return RepositorySettings(intra_op_threads=1, version_policy=VersionPolicy.parse(policy))


@pytest.mark.parametrize(
    "text, kind, count, versions, shown",
    [
        ("latest", "latest", 1, (), "latest:1"),
        ("latest:1", "latest", 1, (), "latest:1"),
        (" Latest:3 ", "latest", 3, (), "latest:3"),
        ("all", "all", 1, (), "all"),
        ("6,7", "specific", 1, (7, 6), "7,6"),
        ("7, 6,6", "specific", 1, (7, 6), "7,6"),
        ("4", "specific", 1, (4,), "4"),
    ],
)
def test_version_policy_parses_each_form(text, kind, count, versions, shown):
    policy = VersionPolicy.parse(text)
    assert (policy.kind, policy.count, policy.versions, str(policy)) == (kind, count, versions, shown)
    assert VersionPolicy.parse(str(policy)) == policy
    assert VersionPolicy() == VersionPolicy.parse("latest") == RepositorySettings().version_policy  # today's behaviour


@pytest.mark.parametrize("text", ["", "newest", "latest:", "latest:0", "latest:-1", "latest:two", "latest:2,3", "all:2", "0", "6,,7", "6;7", "-6", "1.5", "6,all"])
def test_version_policy_refuses_bad_values_naming_the_flag_and_forms(text):
    with pytest.raises(UserError) as raised:
        VersionPolicy.parse(text)
    message = str(raised.value)
    assert message.startswith(f"--version-policy {text!r}: expected latest")
    assert all(form in message for form in ("latest:N", "all", "6,7"))


def test_latest_two_serves_the_two_newest_versions(tmp_path):
    build_model_repository(tmp_path, versions=(1, 2, 3))
    metrics = Metrics()
    images = random_images(2)

    async def main():
        repository = ModelRepository(tmp_path, policy_settings("latest:2"), metrics)
        report = await repository.reload()
        try:
            newest, older = repository.get(), repository.get("tiny", 2)
            with pytest.raises(ModelNotFound, match=r"^model 'tiny' version 1 is not served \(serving versions 3, 2\)$"):
                repository.get("tiny", 1)
            outputs = {v: (await repository.get("tiny", v).batcher.submit(images)).outputs for v in (3, 2)}
            listed = [m.key for m in repository.loaded()]
            states = [(s.version, s.state) for s in repository.statuses()]
        finally:
            await repository.close()
        return report, newest, older, outputs, listed, states

    report, newest, older, outputs, listed, states = asyncio.run(main())
    assert report.loaded == [("tiny", 3), ("tiny", 2)] and not report.failed
    assert (newest.contract.version, older.contract.version) == (3, 2)
    for version in (3, 2):  # each version answers with its own network
        np.testing.assert_allclose(outputs[version]["score"], reference_outputs(tmp_path / "tiny" / str(version), images)["score"], atol=1e-6)
    assert not np.allclose(outputs[3]["score"], outputs[2]["score"])
    assert listed == [("tiny", 3), ("tiny", 2)]
    assert states == [(3, "READY"), (2, "READY"), (1, "UNLOADED")]
    assert (ready(metrics, "tiny", 3), ready(metrics, "tiny", 2), ready(metrics, "tiny", 1)) == (1, 1, None)


def test_specific_versions_serve_only_those_listed(tmp_path):
    build_model_repository(tmp_path, versions=(5, 6, 7, 8))
    build_model_repository(tmp_path, name="other", versions=(1, 2))

    async def main():
        repository = ModelRepository(tmp_path, policy_settings("6,7,9"))
        report = await repository.reload()
        try:
            served = {v: repository.get("tiny", v).contract.version for v in (0, 6, 7)}
            for version in (5, 8, 9):
                with pytest.raises(ModelNotFound, match=f"version {version} is not served \\(serving versions 7, 6\\)"):
                    repository.get("tiny", version)
            with pytest.raises(ModelNotReady, match=r"model 'other' has no loaded version \(version policy 9,7,6 selects none of its versions 2, 1\)"):
                repository.get("other")
            states = {(s.name, s.version): s.state for s in repository.statuses()}
        finally:
            await repository.close()
        return report, served, states

    report, served, states = asyncio.run(main())
    assert sorted(report.loaded) == [("tiny", 6), ("tiny", 7)]
    assert served == {0: 7, 6: 6, 7: 7}
    assert [states[("tiny", v)] for v in (8, 7, 6, 5)] == ["UNLOADED", "READY", "READY", "UNLOADED"]
    assert states[("other", 2)] == states[("other", 1)] == "UNLOADED"


def test_all_versions_serve_and_a_broken_one_is_skipped(tmp_path):
    build_model_repository(tmp_path, versions=(1, 2, 3))
    corrupt_onnx(tmp_path / "tiny" / "2")
    metrics = Metrics()

    async def main():
        repository = ModelRepository(tmp_path, policy_settings("all"), metrics)
        report = await repository.reload()
        again = await repository.reload()  # unchanged: nothing loaded, failed or unloaded
        try:
            served = {v: repository.get("tiny", v).contract.version for v in (0, 1, 3)}
            with pytest.raises(ModelNotFound, match=r"version 2 is not served \(serving versions 3, 1\)"):
                repository.get("tiny", 2)
            states = {s.version: (s.state, s.error) for s in repository.statuses()}
        finally:
            await repository.close()
        return report, again, served, states

    report, again, served, states = asyncio.run(main())
    assert report.loaded == [("tiny", 3), ("tiny", 1)] and [(n, v) for n, v, _ in report.failed] == [("tiny", 2)]
    assert not (again.loaded or again.failed or again.unloaded)
    assert served == {0: 3, 1: 1, 3: 3}
    assert states[2][0] == "UNAVAILABLE" and "ONNX Runtime cannot load" in states[2][1]
    assert states[3][0] == states[1][0] == "READY"
    assert failures(metrics, "tiny", 2) == 1 and ready(metrics, "tiny", 2) is None


def test_latest_two_reload_unloads_the_oldest_after_its_requests_finish(tmp_path):
    build_model_repository(tmp_path, versions=(1, 2))
    metrics = Metrics()

    async def main():
        repository = ModelRepository(tmp_path, policy_settings("latest:2"), metrics)
        await repository.reload()
        first, second = repository.get("tiny", 1), repository.get("tiny", 2)
        holder = first.use()
        holder.__enter__()  # a request still using v1
        write_model_version(tmp_path, "tiny", 3)
        reload = asyncio.ensure_future(repository.reload())
        await asyncio.sleep(0.3)
        assert repository.get().contract.version == 3  # v3 already serves new requests
        assert repository.get("tiny", 2) is second  # v2 is kept, not reloaded
        with pytest.raises(ModelNotFound, match=r"serving versions 3, 2\)"):
            repository.get("tiny", 1)  # new requests no longer reach v1
        assert not reload.done()  # but v1 is not unloaded while in use
        result = await first.batcher.submit(random_images(1))  # and v1 still answers its holder
        holder.__exit__(None, None, None)
        report = await reload
        write_model_version(tmp_path, "tiny", 4)
        corrupt_onnx(tmp_path / "tiny" / "4")
        broken = await repository.reload()  # a broken newest version: 3 and 2 keep serving
        served = [m.key for m in repository.loaded()]
        await repository.close()
        return report, result, broken, served

    report, result, broken, served = asyncio.run(main())
    assert report.loaded == [("tiny", 3)] and report.unloaded == [("tiny", 1)]
    assert result.outputs["score"].shape == (1,)
    assert [(n, v) for n, v, _ in broken.failed] == [("tiny", 4)] and not broken.loaded and not broken.unloaded
    assert served == [("tiny", 3), ("tiny", 2)]
    assert (ready(metrics, "tiny", 1), ready(metrics, "tiny", 2), ready(metrics, "tiny", 3)) == (0, 1, 1)


def test_batching_flags_override_model_json(tmp_path):
    build_model_repository(tmp_path)

    async def main():
        repository = ModelRepository(tmp_path, RepositorySettings(intra_op_threads=1, max_batch_size=3, max_queue_delay_ms=7))
        await repository.reload()
        batcher = repository.get().batcher
        await repository.close()
        return batcher

    batcher = asyncio.run(main())
    assert batcher.max_batch_size == 3 and batcher.max_queue_delay == pytest.approx(0.007)
    assert batcher.max_queue_size == 256  # from model.json


def test_models_list_table_and_json(tmp_path, capsys):
    build_model_repository(tmp_path, versions=(1, 2))
    with open(tmp_path / "tiny" / "2" / c.ONNX_FILE, "ab") as handle:
        handle.write(b"\0")
    assert cli(["models", "list", "--model-repository", str(tmp_path)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:4] == ["NAME", "VERSION", "ARCHITECTURE", "INPUT"]
    assert "error:" in table[1] and "sha256" in table[1]
    assert table[2].split()[:5] == ["tiny", "1", "tiny_cam", "32x32", "4x4"] and table[2].endswith("ok")
    assert cli(["models", "list", "--model-repository", str(tmp_path), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["version"], r["status"] == "ok") for r in rows] == [(2, False), (1, True)]
    assert cli(["models", "list", "--model-repository", str(tmp_path / "missing")]) == 2


def default_version_settings(policy: str, version: int, model: str = "") -> RepositorySettings:
    return RepositorySettings(intra_op_threads=1, version_policy=VersionPolicy.parse(policy), default_version=version, default_model=model)


def test_default_version_serves_requests_that_name_no_version(tmp_path):
    build_model_repository(tmp_path, versions=(1, 2, 3))
    build_model_repository(tmp_path, name="other", versions=(1, 2, 3))

    async def main():
        repository = ModelRepository(tmp_path, default_version_settings("latest:3", 2, model="tiny"))  # "other" sorts first
        await repository.reload()
        try:
            served = {(name, v): repository.get(name, v).contract.version for name in ("", "tiny", "other") for v in (0, 3)}
            repository.check_default_version()  # v2 serves: start-up passes
            return served, repository.default_name, repository.default_version(), repository.default_version("other")
        finally:
            await repository.close()

    served, name, default, other = asyncio.run(main())
    assert name == "tiny" and (default, other) == (2, 3)
    assert served[("", 0)] == served[("tiny", 0)] == 2  # versionless, by default or by name: v2
    assert served[("", 3)] == served[("tiny", 3)] == 3  # an explicit version is kept
    assert served[("other", 0)] == 3  # other models: the newest as before


def test_default_version_not_loaded_falls_back_to_the_newest_with_one_warning_a_reload(tmp_path, caplog):
    build_model_repository(tmp_path, versions=(1, 2, 3))
    corrupt_onnx(tmp_path / "tiny" / "2")

    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "--default-version" in r.getMessage()]

    async def main():
        repository = ModelRepository(tmp_path, default_version_settings("latest:2", 2))
        seen = []
        try:
            await repository.reload()  # v2 broken: v3 and v1 serve
            seen.append(([repository.get().contract.version for _ in range(5)], warnings()))
            await repository.reload()
            seen.append(([repository.get("tiny").contract.version], warnings()))
            write_model_version(tmp_path, "tiny", 2)  # repaired: v3 and v2 serve
            await repository.reload()
            seen.append(([repository.get().contract.version], warnings()))
            write_model_version(tmp_path, "tiny", 4)  # latest:2 retires v2
            await repository.reload()
            seen.append(([repository.get().contract.version], warnings()))
            with pytest.raises(UserError, match=r"^--default-version 2: model 'tiny' version 2 is not served under --version-policy latest:2 \(serving 4, 3; the policy leaves it out\)$"):
                repository.check_default_version()
        finally:
            await repository.close()
        return seen

    caplog.set_level("WARNING", logger="serving.repository")
    broken, again, repaired, retired = asyncio.run(main())
    assert broken[0] == [3] * 5 and len(broken[1]) == 1  # five requests, one warning
    assert "version 2 is not served" in broken[1][0] and "it failed to load: " in broken[1][0] and "ONNX Runtime cannot load" in broken[1][0]
    assert broken[1][0].endswith("requests naming no version get v3")
    assert again[0] == [3] and len(again[1]) == 2  # one more for the second reload
    assert repaired[0] == [2] and len(repaired[1]) == 2  # serving v2 again: no warning
    assert retired[0] == [4] and len(retired[1]) == 3 and "serving 4, 3; the policy leaves it out" in retired[1][-1]


@pytest.mark.parametrize(
    "policy, version, message",
    [
        ("latest", -1, "--default-version -1: must not be negative (0 = the newest served version)"),
        ("6,7", 5, "--default-version 5: --version-policy 7,6 does not serve version 5"),
        ("4", 3, "--default-version 3: --version-policy 4 does not serve version 3"),
    ],
)
def test_default_version_refused_by_the_policy_form_names_the_flags(policy, version, message):
    with pytest.raises(UserError) as raised:
        VersionPolicy.parse(policy).check_default(version)
    assert str(raised.value).startswith(message)


@pytest.mark.parametrize("policy, version", [("latest", 0), ("latest", 7), ("latest:2", 9), ("all", 3), ("6,7", 6), ("6,7", 0)])
def test_default_version_allowed_by_the_policy_form(policy, version):
    VersionPolicy.parse(policy).check_default(version)  # latest and all: checked after loading


def write_int8_of(root, source: int, version: int, name: str = "tiny"):
    """Version `version` recorded as the int8 graph quantised from version `source` (what
    `cyborg export --precision int8` writes: precision and metrics.int8.fp32_sha256)."""
    folder = write_model_version(root, name, version)
    fp32 = c.read_contract(root / name / str(source), verify=False).files[c.ONNX_FILE]
    contract = c.read_contract(folder, verify=False)
    c.write_contract(folder, c.ModelContract.from_dict({**contract.to_dict(), "precision": "int8", "metrics": {"int8": {"fp32_sha256": fp32}}}))
    return folder


def versionless(tmp_path, settings: RepositorySettings, reloads: int = 1, named: int = 2) -> tuple[int, int, int, int]:
    """The versions served after `reloads` reloads to a request naming none, to one naming the model
    "tiny" but no version, to one naming version `named`, and `default_version()`."""

    async def main():
        repository = ModelRepository(tmp_path, settings)
        try:
            for _ in range(reloads):
                await repository.reload()
            requests = [repository.get(), repository.get("tiny"), repository.get("tiny", named)]
            return *(model.contract.version for model in requests), repository.default_version()
        finally:
            await repository.close()

    return asyncio.run(main())


def gpu_notes(caplog) -> list[str]:
    return [f"{r.levelname} {r.getMessage()}" for r in caplog.records if "int8" in r.getMessage() and r.name == "serving.repository"]


def test_on_cpu_the_newest_int8_version_serves_requests_that_name_no_version(tmp_path, caplog):
    write_model_version(tmp_path, "tiny", 1)
    write_int8_of(tmp_path, source=1, version=2)
    caplog.set_level("INFO", logger="serving.repository")
    assert versionless(tmp_path, default_version_settings("latest:2", 0)) == (2, 2, 2, 2)
    assert gpu_notes(caplog) == []


def test_on_cuda_requests_naming_no_version_get_the_fp32_source_of_the_newest_int8_version(tmp_path, caplog, on_cuda):
    write_model_version(tmp_path, "tiny", 1)  # an unrelated older fp32 version
    write_model_version(tmp_path, "tiny", 2)  # the fp32 graph that v3 quantises
    write_int8_of(tmp_path, source=2, version=3)
    caplog.set_level("INFO", logger="serving.repository")
    # two reloads, the second unchanged: logged once, not each reload
    assert versionless(tmp_path, default_version_settings("all", 0), reloads=2, named=3) == (2, 2, 3, 2)  # versionless: v2; an explicit version is kept
    assert gpu_notes(caplog) == [
        "INFO model tiny: requests naming no version get v2 (fp32), not v3: v3 is its int8 graph, made for CPUs, and this server runs on CUDA"
    ]


def test_on_cuda_an_explicit_default_version_wins_over_the_fp32_source(tmp_path, caplog, on_cuda):
    write_model_version(tmp_path, "tiny", 1)
    write_int8_of(tmp_path, source=1, version=2)
    caplog.set_level("INFO", logger="serving.repository")
    assert versionless(tmp_path, default_version_settings("latest:2", 2)) == (2, 2, 2, 2)
    assert gpu_notes(caplog) == []


def test_on_cuda_an_unserved_fp32_source_is_named_with_the_policy_that_serves_it(tmp_path, caplog, on_cuda):
    write_model_version(tmp_path, "tiny", 1)
    write_int8_of(tmp_path, source=1, version=2)
    caplog.set_level("INFO", logger="serving.repository")
    assert versionless(tmp_path, default_version_settings("latest", 0), reloads=2) == (2, 2, 2, 2)
    assert gpu_notes(caplog) == [
        f"WARNING model tiny v2 is an int8 graph made for CPUs and this server runs on CUDA; the fp32 version it was quantised from is not served "
        f"({tmp_path / 'tiny' / '1'} holds it: serve it too, e.g. --version-policy latest:2): requests naming no version get the int8 graph"
    ]


def test_on_cuda_an_int8_version_whose_source_is_gone_serves_with_a_warning(tmp_path, caplog, on_cuda):
    write_model_version(tmp_path, "tiny", 1)
    write_int8_of(tmp_path, source=1, version=2)
    write_model_version(tmp_path, "tiny", 1, seed=7)  # v1 re-exported: no longer the graph v2 was quantised from
    caplog.set_level("INFO", logger="serving.repository")
    assert versionless(tmp_path, default_version_settings("all", 0)) == (2, 2, 2, 2)
    [note] = gpu_notes(caplog)
    assert note.startswith("WARNING model tiny v2 is an int8 graph") and f"no version under {tmp_path / 'tiny'} has model.onnx sha256 " in note

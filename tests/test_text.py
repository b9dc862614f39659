import math

import pytest
import torch

from engine.models.text import (WAN_T5_CHECKPOINT, WAN_T5_TOKENIZER, PromptCache, TinyTextEncoder,
                                UMT5TextEncoder, blend_embeddings, clean_prompt, umt5_xxl_config,
                                wan_t5_key_map)
from engine.models.weights import CheckpointMismatch

TEXT_LEN = 16
PROMPTS = ["a cat walking in the snow", "oil painting of a city street at night"]


# --------------------------------------------------------------------------- tiny encoder


def test_tiny_encoder_shape_and_zero_past_length():
    encoder = TinyTextEncoder(text_len=TEXT_LEN, text_dim=8)
    out = encoder.encode(["ab", "hello"])
    assert out.shape == (2, TEXT_LEN, 8)
    for row, prompt in enumerate(["ab", "hello"]):
        length = len(prompt) + 1  # bytes and the end token
        assert out[row, :length].abs().sum(dim=-1).min() > 0
        assert torch.all(out[row, length:] == 0)


def test_tiny_encoder_truncates_long_prompts():
    encoder = TinyTextEncoder(text_len=TEXT_LEN, text_dim=8)
    out = encoder.encode(["x" * 100])
    assert out.shape == (1, TEXT_LEN, 8)
    assert out[0].abs().sum(dim=-1).min() > 0


def test_tiny_encoder_is_deterministic_and_tells_prompts_apart():
    first = TinyTextEncoder(text_len=TEXT_LEN, text_dim=8, seed=3).encode(PROMPTS)
    again = TinyTextEncoder(text_len=TEXT_LEN, text_dim=8, seed=3).encode(PROMPTS)
    other_seed = TinyTextEncoder(text_len=TEXT_LEN, text_dim=8, seed=4).encode(PROMPTS)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other_seed)
    assert not torch.allclose(first[0], first[1])


@pytest.mark.parametrize("prompts", [[], "a cat", [1, 2], None])
def test_bad_prompts_name_the_argument(prompts):
    with pytest.raises(ValueError, match="prompts"):
        TinyTextEncoder(text_len=TEXT_LEN, text_dim=8).encode(prompts)


def test_offload_moves_weights_to_cpu_and_encode_brings_them_back():
    encoder = TinyTextEncoder(text_len=TEXT_LEN, text_dim=8, device="cpu")
    before = encoder.encode(PROMPTS)
    encoder.offload()
    assert encoder.offloaded
    assert all(p.device.type == "cpu" for p in encoder.model.parameters())
    after = encoder.encode(PROMPTS)
    assert not encoder.offloaded
    assert torch.equal(before, after)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_offload_frees_the_gpu_copy():
    encoder = TinyTextEncoder(text_len=TEXT_LEN, text_dim=8, device="cuda")
    before = encoder.encode(PROMPTS)
    assert before.device.type == "cuda"
    encoder.offload()
    assert all(p.device.type == "cpu" for p in encoder.model.parameters())
    after = encoder.encode(PROMPTS)
    assert all(p.device.type == "cuda" for p in encoder.model.parameters())
    assert after.device.type == "cuda"
    assert torch.allclose(before, after)


# --------------------------------------------------------------------------- umT5


def build_tokenizer():
    """A tiny SentencePiece-style (unigram) tokenizer with T5's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=60, special_tokens=["<pad>", "</s>", "<unk>"],
                                      unk_token="<unk>")
    tokenizer.train_from_iterator(PROMPTS * 4 + ["a dog running on the beach", "watercolor forest"],
                                  trainer)
    eos = tokenizer.token_to_id("</s>")
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", eos)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>")


def tiny_umt5_config():
    from transformers import UMT5Config
    return UMT5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=24, num_heads=4, num_layers=2,
                      relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
                      is_encoder_decoder=False, use_cache=False)


def to_wan_names(model) -> dict[str, torch.Tensor]:
    """The model's weights under Wan's names: the key map read backwards."""
    state = model.state_dict()
    return {wan: state[hf].clone() for wan, hf in wan_t5_key_map(model.config.num_layers).items()}


@pytest.fixture(scope="module")
def umt5(tmp_path_factory):
    """A tiny random umT5 saved in both layouts."""
    from transformers import UMT5EncoderModel

    torch.manual_seed(0)
    model = UMT5EncoderModel(tiny_umt5_config()).eval()
    tokenizer = build_tokenizer()

    transformers_folder = tmp_path_factory.mktemp("umt5_transformers")
    model.save_pretrained(transformers_folder)
    tokenizer.save_pretrained(transformers_folder)

    wan_folder = tmp_path_factory.mktemp("wan")
    torch.save(to_wan_names(model), wan_folder / WAN_T5_CHECKPOINT)
    tokenizer.save_pretrained(wan_folder / WAN_T5_TOKENIZER)
    return {"model": model, "tokenizer": tokenizer, "transformers": transformers_folder, "wan": wan_folder}


def load(folder, **kwargs):
    return UMT5TextEncoder.load(folder, dtype=torch.float32, text_len=TEXT_LEN,
                                wan_config=tiny_umt5_config(), **kwargs)


def test_both_layouts_load_and_agree(umt5):
    prompts = ["a cat in the snow", PROMPTS[1]]  # shorter and longer than TEXT_LEN tokens
    from_transformers = load(umt5["transformers"])
    from_wan = load(umt5["wan"])
    out = from_transformers.encode(prompts)
    assert out.shape == (2, TEXT_LEN, 16)
    assert torch.allclose(out, from_wan.encode(prompts), atol=1e-6)

    # The same numbers as running the original model by hand, zero past the tokens.
    tokens = umt5["tokenizer"](prompts, padding="max_length", max_length=TEXT_LEN, truncation=True,
                               return_tensors="pt")
    with torch.no_grad():
        direct = umt5["model"](**tokens).last_hidden_state
    lengths = tokens["attention_mask"].sum(dim=1)
    assert lengths[0] < TEXT_LEN == lengths[1]  # one padded, one truncated
    for row, length in enumerate(lengths.tolist()):
        assert torch.allclose(out[row, :length], direct[row, :length], atol=1e-6)
        assert torch.all(out[row, length:] == 0)


def test_wan_loading_keeps_one_embedding_table(umt5):
    model = load(umt5["wan"]).model
    assert model.shared.weight is model.encoder.embed_tokens.weight
    assert not any(p.is_meta for p in model.parameters())
    assert not model.training


def test_wan_feed_forward_names_keep_their_roles(umt5):
    """Wan computes fc2(fc1(x) * gelu_tanh(gate.0(x))): the gate must land on the GELU branch."""
    wan = to_wan_names(umt5["model"])
    x = torch.randn(3, 16)
    gate, fc1, fc2 = (wan[f"blocks.0.ffn.{name}.weight"] for name in ("gate.0", "fc1", "fc2"))
    by_wan_formula = (x @ fc1.T * torch.nn.functional.gelu(x @ gate.T, approximate="tanh")) @ fc2.T
    ffn = load(umt5["wan"]).model.encoder.block[0].layer[1].DenseReluDense
    with torch.no_grad():
        assert torch.allclose(ffn(x), by_wan_formula, atol=1e-5)


def test_key_map_covers_the_full_size_model():
    from transformers import UMT5EncoderModel

    config = umt5_xxl_config()
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    expected = set(model.state_dict()) - {"encoder.embed_tokens.weight"}  # tied to shared.weight
    assert set(wan_t5_key_map(config.num_layers).values()) == expected
    counts = sum(p.numel() for p in model.parameters())
    assert 5.6e9 < counts < 5.8e9  # umT5-XXL's encoder: ~11 GB in bf16


def test_broken_wan_checkpoint_is_named_in_wan_terms(umt5, tmp_path):
    state = to_wan_names(umt5["model"])
    del state["blocks.1.attn.q.weight"]
    state["blocks.1.attn.extra.weight"] = torch.zeros(2)
    state["blocks.0.ffn.fc1.weight"] = torch.zeros(5, 16)
    torch.save(state, tmp_path / WAN_T5_CHECKPOINT)
    umt5["tokenizer"].save_pretrained(tmp_path / WAN_T5_TOKENIZER)
    with pytest.raises(CheckpointMismatch) as caught:
        load(tmp_path)
    message = str(caught.value)
    assert "blocks.1.attn.q.weight" in message
    assert "blocks.1.attn.extra.weight" in message
    assert "blocks.0.ffn.fc1.weight" in message and "[5, 16]" in message


def test_wan_checkpoint_of_another_size_is_refused(umt5):
    """The default config is umT5-XXL; a tiny checkpoint does not fit it."""
    with pytest.raises(CheckpointMismatch, match="token_embedding.weight"):
        UMT5TextEncoder.load(umt5["wan"])


def test_broken_transformers_folder_is_refused(umt5, tmp_path):
    from safetensors.torch import load_file, save_file

    for item in umt5["transformers"].iterdir():
        (tmp_path / item.name).write_bytes(item.read_bytes())
    weights = load_file(tmp_path / "model.safetensors")
    del weights["encoder.block.0.layer.0.SelfAttention.k.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatch, match="SelfAttention.k.weight"):
        load(tmp_path)


def test_folder_without_an_encoder_says_what_it_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match=WAN_T5_CHECKPOINT):
        UMT5TextEncoder.load(tmp_path)


def test_prompts_are_cleaned_like_wan(umt5):
    assert clean_prompt("  a\tcat &amp;amp;\n dog ") == "a cat & dog"
    encoder = load(umt5["transformers"])
    assert torch.equal(encoder.encode(["a cat\n walking  "]), encoder.encode(["a cat walking"]))


# --------------------------------------------------------------------------- cache


class CountingEncoder(TinyTextEncoder):
    def __init__(self):
        super().__init__(text_len=TEXT_LEN, text_dim=8)
        self.encoded: list[str] = []

    def _embed(self, prompts):
        self.encoded += prompts
        return super()._embed(prompts)


def test_cache_hits_and_evicts_the_least_recently_used():
    encoder = CountingEncoder()
    cache = PromptCache(encoder, capacity=2)
    first = cache.encode(["a", "b"])
    assert torch.equal(first, encoder.encode(["a", "b"]))
    encoder.encoded.clear()

    assert torch.equal(cache.encode(["a"]), first[:1])   # hit; "a" is now the most recent
    assert encoder.encoded == []
    cache.encode(["c"])                                  # evicts "b"
    assert encoder.encoded == ["c"]
    assert "a" in cache and "c" in cache and "b" not in cache
    assert len(cache) == 2
    assert (cache.hits, cache.misses) == (1, 3)


def test_cache_encodes_each_new_prompt_once_per_batch():
    encoder = CountingEncoder()
    cache = PromptCache(encoder, capacity=4)
    out = cache.encode(["x", "y", "x"])
    assert encoder.encoded == ["x", "y"]
    assert torch.equal(out[0], out[2])


def test_cache_capacity_must_be_positive():
    with pytest.raises(ValueError, match="capacity"):
        PromptCache(CountingEncoder(), capacity=0)


# --------------------------------------------------------------------------- blending


def embeddings(seed=0, tokens=6, dim=8):
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(1, tokens, dim, generator=generator)
    b = torch.randn(1, tokens, dim, generator=generator) * 3  # different lengths per token
    a[:, -2:] = 0  # zero padding past the prompt's length
    b[:, -1:] = 0
    return a, b


@pytest.mark.parametrize("method", ["linear", "slerp"])
def test_blend_endpoints_are_the_inputs(method):
    a, b = embeddings()
    assert torch.allclose(blend_embeddings([a, b], [1, 0], method), a, atol=1e-5)
    assert torch.allclose(blend_embeddings([a, b], [0, 1], method), b, atol=1e-5)
    assert torch.allclose(blend_embeddings([a], [2.0], method), a)


def test_linear_blend_normalises_weights():
    a, b = embeddings()
    c = torch.randn_like(a)
    assert torch.allclose(blend_embeddings([a, b], [2, 2]), (a + b) / 2)
    assert torch.allclose(blend_embeddings([a, b, c], [1, 1, 2]), 0.25 * a + 0.25 * b + 0.5 * c)


@pytest.mark.parametrize("t", [0.25, 0.5, 0.8])
def test_slerp_keeps_each_token_norm_between_the_endpoints(t):
    a, b = embeddings()
    mixed = blend_embeddings([a, b], [1 - t, t], "slerp")
    lengths = [x.norm(dim=-1) for x in (a, b, mixed)]
    low = torch.minimum(lengths[0], lengths[1]) - 1e-5
    high = torch.maximum(lengths[0], lengths[1]) + 1e-5
    assert torch.all((lengths[2] >= low) & (lengths[2] <= high))
    assert torch.all(mixed[:, -1:] == 0)  # padding in both stays zero
    # Equal-length vectors keep their length exactly, unlike the linear blend.
    unit_a = a[:, :3] / a[:, :3].norm(dim=-1, keepdim=True)
    unit_b = b[:, :3] / b[:, :3].norm(dim=-1, keepdim=True)
    spherical = blend_embeddings([unit_a, unit_b], [1 - t, t], "slerp")
    assert torch.allclose(spherical.norm(dim=-1), torch.ones(1, 3), atol=1e-5)


def test_blend_keeps_dtype():
    a, b = (x.to(torch.bfloat16) for x in embeddings())
    assert blend_embeddings([a, b], [0.3, 0.7], "slerp").dtype == torch.bfloat16


@pytest.mark.parametrize("inputs, weights, method, argument", [
    (3, [1, 1, 1], "slerp", "slerp"),
    (2, [1, 1], "cubic", "method"),
    (2, [1], "linear", "weights"),
    (2, [1, -1], "linear", "weights"),
    (2, [0, 0], "linear", "weights"),
    (2, [1, math.nan], "linear", "weights"),
    (0, [], "linear", "embeddings"),
])
def test_bad_blends_name_the_argument(inputs, weights, method, argument):
    tensors = [torch.randn(1, 4, 8) for _ in range(inputs)]
    with pytest.raises(ValueError, match=argument):
        blend_embeddings(tensors, weights, method)


def test_blend_needs_one_shape():
    with pytest.raises(ValueError, match="embeddings"):
        blend_embeddings([torch.zeros(1, 4, 8), torch.zeros(1, 5, 8)], [1, 1])

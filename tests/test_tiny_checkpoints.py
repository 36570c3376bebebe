"""The shipped tiny trained checkpoints (assets/tiny-dream, assets/tiny-llada) and the script that trains them."""

import importlib.util
import json
import math
import os

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModel, AutoTokenizer

import models  # noqa: F401  (Auto registrations)
from dkvcache.tasks import arith
from models import DreamConfig, DreamModel, LLaDAConfig, LLaDAModelLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(ROOT, "assets")
DREAM_DIR = os.path.join(ASSETS, "tiny-dream")
LLADA_DIR = os.path.join(ASSETS, "tiny-llada")
CHECKPOINTS = {"dream": (DREAM_DIR, DreamModel, DreamConfig), "llada": (LLADA_DIR, LLaDAModelLM, LLaDAConfig)}
# Held-out items (indices into dkvcache/tasks/data/arith_test.jsonl) both checkpoints answer right with vanilla
# decoding; several phrasings and 4-7 terms.
FIXED_ITEMS = [0, 1, 2, 3, 4, 5]


def _load(arch, cls=None):
    path, model_cls, _ = CHECKPOINTS[arch]
    model = (cls or model_cls).from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module", params=["dream", "llada"])
def arch(request):
    return request.param


def test_checkpoint_files(arch):
    path = CHECKPOINTS[arch][0]
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json"):
        assert os.path.isfile(os.path.join(path, name)), name
    assert not any(n.startswith("model-") or n.endswith(".index.json") for n in os.listdir(path))
    total = sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path))
    assert total <= 20 * 1024 * 1024


def test_real_key_names_and_bf16(arch):
    path = CHECKPOINTS[arch][0]
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        dtypes = {f.get_slice(k).get_dtype() for k in keys}
    assert dtypes == {"BF16"}
    if arch == "dream":
        n = config["num_hidden_layers"]
        expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
        for i in range(n):
            p = f"model.layers.{i}."
            expected |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight",
                         p + "self_attn.o_proj.weight"}
            expected |= {p + f"self_attn.{x}_proj.{w}" for x in "qkv" for w in ("weight", "bias")}
            expected |= {p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")}
        assert config["model_type"] == "Dream" and config["architectures"] == ["DreamModel"]
        assert config["num_key_value_heads"] < config["num_attention_heads"]  # GQA
    else:
        n = config["n_layers"]
        expected = {"model.transformer.wte.weight", "model.transformer.ln_f.weight", "model.transformer.ff_out.weight"}
        for i in range(n):
            p = f"model.transformer.blocks.{i}."
            expected |= {p + f"{x}.weight" for x in ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj",
                                                     "ff_out", "attn_norm", "ff_norm")}
        assert config["model_type"] == "llada" and config["architectures"] == ["LLaDAModelLM"]
        for field in ("d_model", "n_heads", "n_kv_heads", "mlp_hidden_size", "embedding_size", "max_sequence_length"):
            assert field in config
    assert keys == expected


def test_special_tokens_mirror_the_real_overlaps(arch):
    path, _, config_cls = CHECKPOINTS[arch]
    config = config_cls.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert config.mask_token_id == tok.mask_token_id
    assert config.eos_token_id == tok.eos_token_id == tok.pad_token_id == config.pad_token_id
    assert config.bos_token_id == tok.bos_token_id
    assert len(tok) <= config.vocab_size
    if arch == "dream":
        assert tok.bos_token == tok.eos_token == tok.pad_token == "<|endoftext|>"
        assert tok.mask_token == "<|mask|>"
    else:
        assert tok.eos_token == tok.pad_token == "<|endoftext|>" and tok.bos_token == "<|startoftext|>"
        assert tok.mask_token == "<|mdm_mask|>"
    assert len({tok.mask_token_id, tok.eos_token_id}) == 2
    with open(os.path.join(path, "tokenizer_config.json")) as f:
        assert "chat_template" in json.load(f)


def test_tokenizer_chat_template_and_round_trip(arch):
    tok = AutoTokenizer.from_pretrained(CHECKPOINTS[arch][0])
    text = tok.apply_chat_template([{"role": "user", "content": "What is 7 + 3?"}], add_generation_prompt=True,
                                   tokenize=False)
    if arch == "dream":
        assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                        "What is 7 + 3?<|im_end|>\n<|im_start|>assistant\n")
    else:
        assert text == ("<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nWhat is 7 + 3?<|eot_id|>"
                        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text
    answer = arith.make_item([7, 3, 9, 2, 5, 8], template=1).answer
    assert tok.decode(tok(answer, add_special_tokens=False)["input_ids"]) == answer


def test_loads_through_class_and_automodel(arch):
    path, model_cls, config_cls = CHECKPOINTS[arch]
    model, _ = _load(arch)
    auto = AutoModel.from_pretrained(path, dtype=torch.float32)
    assert type(model) is model_cls and type(auto) is model_cls
    assert isinstance(model.config, config_cls)
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), auto.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    # float32 load of bf16 weights is exact
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        name = next(iter(f.keys()))
        assert torch.equal(f.get_tensor(name).float(), model.state_dict()[name])


def test_answers_fixed_heldout_prompts_with_vanilla_decoding(arch):
    model, tok = _load(arch)
    rows = [arith.load_jsonl()[i] for i in FIXED_ITEMS]
    kwargs = arith.default_generation_kwargs(arch)
    res = arith.evaluate(model, tok, rows, batch_size=len(rows), **kwargs)
    wrong = [p for p in res["predictions"] if not p["correct"]]
    assert not wrong, wrong
    for p, row in zip(res["predictions"], rows):
        assert p["prediction"] == row["answer"]  # the written steps too, not just the number
    # the answer is followed by EOS padding (instruct-style), so response tokens < gen length
    assert res["response_tokens"] < len(rows) * arith.GEN_LENGTH


def test_cli_prints_accuracy(capsys):
    assert arith.main(["--model", DREAM_DIR, "--limit", "2", "steps=32", "--json"]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "tokens/s" in out and "tokens/forward" in out
    record = json.loads(out.strip().splitlines()[-1])
    assert record["kwargs"]["steps"] == 32 and record["n"] == 2


def _train_module():
    spec = importlib.util.spec_from_file_location("train_tiny", os.path.join(ROOT, "examples", "train_tiny.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("train_arch", ["dream", "llada"])
def test_train_script_runs_a_few_steps(tmp_path, train_arch):
    train_tiny = _train_module()
    threads = torch.get_num_threads()
    kv_heads = "1" if train_arch == "dream" else "2"
    outs = []
    try:
        for run in ("a", "b"):
            out = tmp_path / run
            train_tiny.main(["--arch", train_arch, "--out", str(out), "--steps", "3", "--batch-size", "4",
                             "--hidden", "32", "--layers", "1", "--heads", "2", "--kv-heads", kv_heads,
                             "--warmup", "1", "--log-every", "1", "--eval-limit", "2", "--seed", "3", "--threads", "1"])
            outs.append(out)
    finally:
        torch.set_num_threads(threads)
    out = outs[0]
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "train_log.jsonl"):
        assert (out / name).is_file(), name
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all(r["loss"] > 0 for r in log)
    model = AutoModel.from_pretrained(str(out), dtype=torch.float32)
    assert type(model) is CHECKPOINTS[train_arch][1]
    AutoTokenizer.from_pretrained(str(out))
    # deterministic under --seed
    assert (outs[0] / "model.safetensors").read_bytes() == (outs[1] / "model.safetensors").read_bytes()


class _EchoLM(torch.nn.Module):
    """Logits that ignore the input: enough to check which positions the loss masks and how it weights them."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(vocab))

    def forward(self, x, attention_mask=None):
        class Out:
            logits = self.bias.expand(*x.shape, -1)
        return Out()


@pytest.mark.parametrize("objective", ["bernoulli", "exact"])
def test_diffusion_loss_weighting_estimates_the_mean_ce(objective):
    train_tiny = _train_module()
    vocab, mask_id = 8, 7
    prompt = torch.randint(0, 6, (64, 5))
    response = torch.randint(0, 6, (64, 12))
    gen = torch.Generator().manual_seed(0)
    loss, ce = train_tiny.diffusion_loss(_EchoLM(vocab), "llada", prompt, torch.ones_like(prompt), response,
                                         mask_id, gen, objective=objective)
    # uniform logits: every masked token costs log(V), and the 1/t weighting makes the loss an unbiased
    # estimate of that mean (exactly so per row for "exact", which masks exactly l tokens and weights R/l)
    assert abs(ce.item() - math.log(vocab)) < 1e-5
    if objective == "exact":
        assert abs(loss.item() - math.log(vocab)) < 1e-5
    else:
        assert abs(loss.item() - math.log(vocab)) < 0.5
    with pytest.raises(ValueError, match="objective must be"):
        train_tiny.diffusion_loss(_EchoLM(vocab), "llada", prompt, torch.ones_like(prompt), response, mask_id, gen,
                                  objective="uniform")


class _PositionConfidenceLM(torch.nn.Module):
    """Logits whose confidence grows with the position (the last response position is the most confident) and
    that record every input they see."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.bias = torch.nn.Parameter(torch.zeros(()))
        self.inputs = []

    def forward(self, x, attention_mask=None):
        self.inputs.append(x.clone())
        sharp = torch.arange(x.shape[1], dtype=torch.float32)[None, :, None]
        logits = sharp * torch.nn.functional.one_hot(torch.zeros_like(x), self.vocab).float() + self.bias

        class Out:
            pass
        out = Out()
        out.logits = logits
        return out


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_confidence_masks_mask_the_least_confident_positions(arch):
    train_tiny = _train_module()
    vocab, mask_id, width, length = 8, 7, 5, 12
    prompt = torch.randint(0, 6, (16, width))
    response = torch.randint(0, 6, (16, length))
    model = _PositionConfidenceLM(vocab)
    count = torch.arange(16) % length + 1
    masks = train_tiny.confidence_order_masks(model, arch, prompt, torch.ones_like(prompt), response, mask_id, count)
    # the probe forward sees the whole response masked
    assert (model.inputs[0][:, width:] == mask_id).all()
    # confidence rises with position, so the masked ones are the first `count` (shifted by one for Dream makes
    # no difference to the order)
    expect = torch.arange(length)[None, :] < count[:, None]
    assert torch.equal(masks, expect)
    # in the loss: half the rows take these masks, with as many masked tokens as their random draw
    gen_a, gen_b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    model = _PositionConfidenceLM(vocab)
    train_tiny.diffusion_loss(model, arch, prompt, torch.ones_like(prompt), response, mask_id, gen_a,
                              confidence_masks=0.5)
    plain = _PositionConfidenceLM(vocab)
    train_tiny.diffusion_loss(plain, arch, prompt, torch.ones_like(prompt), response, mask_id, gen_b)
    noisy, random_noisy = model.inputs[-1][:, width:], plain.inputs[-1][:, width:]
    assert torch.equal(noisy[8:], random_noisy[8:])
    assert torch.equal((noisy[:8] == mask_id).sum(1).clamp(min=1), (random_noisy[:8] == mask_id).sum(1).clamp(min=1))
    first = (noisy[:8] == mask_id)
    assert all(torch.equal(row, torch.arange(length) < row.sum()) for row in first)
    for bad in ("-0.1", "1.5"):
        with pytest.raises(SystemExit):
            train_tiny.parse_args(["--arch", arch, "--out", "x", "--confidence-masks", bad])


def test_autoregressive_stage_is_causal_and_switches_to_diffusion(tmp_path, monkeypatch):
    """--ar-steps (Dream's AR initialisation): the loss at response token j only sees tokens before j, the log
    says which stage each step ran, and the option is refused where it makes no sense."""
    train_tiny = _train_module()
    torch.manual_seed(0)
    model = DreamModel(DreamConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, mask_token_id=39))
    prompt, mask = torch.randint(0, 30, (2, 5)), torch.ones(2, 5, dtype=torch.long)
    response = torch.randint(0, 30, (2, 6))
    changed = response.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 30

    mean_ce = torch.nn.functional.cross_entropy
    with monkeypatch.context() as patch, torch.no_grad():  # per-token losses instead of their mean
        patch.setattr(train_tiny.F, "cross_entropy", lambda logits, target: mean_ce(logits, target, reduction="none"))
        a, b = (train_tiny.autoregressive_loss(model, prompt, mask, r)[0].view(2, -1) for r in (response, changed))
    assert torch.allclose(a[:, :-1], b[:, :-1]) and not torch.allclose(a[:, -1], b[:, -1])
    threads = torch.get_num_threads()
    try:
        train_tiny.main(["--arch", "dream", "--task", "chain", "--out", str(tmp_path / "ar"), "--steps", "4",
                         "--ar-steps", "2", "--batch-size", "2", "--hidden", "32", "--layers", "1", "--heads", "2",
                         "--kv-heads", "1", "--warmup", "1", "--log-every", "1", "--no-eval", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    log = [json.loads(line) for line in (tmp_path / "ar" / "train_log.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in log] == ["ar", "ar", "diffusion", "diffusion"]
    for bad in (["--arch", "llada", "--ar-steps", "2"], ["--arch", "dream", "--steps", "3", "--ar-steps", "3"]):
        with pytest.raises(SystemExit):
            train_tiny.parse_args([*bad, "--out", str(tmp_path / "x")])


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_suffix_masks_mask_the_end_of_the_response(arch):
    """--suffix-masks: the last rows mask as many tokens as their random draw, all at the end of the response;
    the other rows keep their random masks."""
    train_tiny = _train_module()
    vocab, mask_id, width, length = 8, 7, 5, 12
    prompt = torch.randint(0, 6, (16, width))
    response = torch.randint(0, 6, (16, length))
    gen_a, gen_b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    model, plain = _PositionConfidenceLM(vocab), _PositionConfidenceLM(vocab)
    train_tiny.diffusion_loss(model, arch, prompt, torch.ones_like(prompt), response, mask_id, gen_a,
                              suffix_masks=0.25)
    train_tiny.diffusion_loss(plain, arch, prompt, torch.ones_like(prompt), response, mask_id, gen_b)
    noisy, random_noisy = model.inputs[-1][:, width:], plain.inputs[-1][:, width:]
    assert torch.equal(noisy[:12], random_noisy[:12])
    counts = (random_noisy[12:] == mask_id).sum(1).clamp(min=1)
    expect = torch.arange(length)[None, :] >= (length - counts)[:, None]
    assert torch.equal(noisy[12:] == mask_id, expect)
    for bad in ("-0.1", "1.5"):
        with pytest.raises(SystemExit):
            train_tiny.parse_args(["--arch", arch, "--out", "x", "--suffix-masks", bad])

#!/usr/bin/env python3
"""Train a tiny masked-diffusion LM in the real Dream or LLaDA checkpoint layout, on a synthetic task.

    python examples/train_tiny.py --arch dream --out /tmp/tiny-dream                 # CPU budget, ~13-16 min
    python examples/train_tiny.py --arch dream --out assets/tiny-dream --device cuda --steps 7000   # the shipped
    python examples/train_tiny.py --task chain --arch llada --out /tmp/llada-stage1 --threads 1    # the shipped:
    python examples/train_tiny.py --task chain --arch llada --out /tmp/llada-stage2 --threads 1 \
        --init /tmp/llada-stage1 --seed 100 --lr 5e-4 --warmup 200 --steps 4000                 # ... + stage 2
    python examples/train_tiny.py --task chain --arch llada --out assets/tiny-llada-chain --threads 1 \
        --init /tmp/llada-stage2 --seed 200 --lr 5e-4 --warmup 200 --steps 4000                 # ... + stage 3
    python examples/train_tiny.py --task chain --arch dream --out assets/tiny-dream-chain --threads 1 --ar-steps 1500

``--task``: ``arith`` (default; ``dkvcache.tasks.arith``) or ``chain`` (``dkvcache.tasks.chain``, state
tracking); the tokenizer keeps the task's words whole. ``--task chain`` defaults to 3 layers, lr 2e-3, 4000
steps of 32 (``TASK_DEFAULTS``). Its CPU budget (the shipped chain checkpoints, seed 0; Dream with
``--ar-steps 1500``): 4000 steps x batch 32, 1 thread each, runs side by side on 2 shared cores, 1459 s (Dream)
and 1473 s (LLaDA) of training (~0.25-0.4 s a step), then a 1-minute evaluation; held-out accuracy (vanilla,
path scoring) 100 % for both. The LLaDA's stages 2 and 3 (``--init``: continue a checkpoint with a fresh
optimizer) took 991 s and 1060 s more and made its yardstick ranking far more seed-independent. From scratch
other seeds often stay on the loss plateau (LLaDA 2 of 5 seeds reached 90 %, Dream 1 of 4; AR-initialised Dream
2 of 2): see docs/accuracy.md.

Writes ``OUT/{config.json, generation_config.json, model.safetensors (bf16), tokenizer.json,
tokenizer_config.json, train_log.jsonl}`` and prints the held-out accuracy of the saved checkpoint with vanilla
decoding. Deterministic under ``--seed`` (same torch version, device and thread count).

Budgets (measured, 300 held-out items, vanilla decoding; see assets/README.md): the CPU default, 3000 steps of
32 (2 cores, 255-330 ms a step), reached 92.3 % (LLaDA) and 78.7 % (Dream); the shipped checkpoints were trained
with ``--device cuda --steps 7000`` (5-6 min on one H100) and reach 100 % for both.

``--ar-steps N`` (Dream only): the first N steps train an autoregressive LM instead (causal attention,
next-token loss), the rest the diffusion loss below: the real Dream is initialised from an AR model (Qwen2.5),
and its shifted layout (position j-1 predicts token j) is that model's.

``--confidence-masks f`` (an experiment, measured and not adopted: docs/accuracy.md): a fraction f of each batch
masks the tokens the model is least confident about with the whole response masked, the contexts a parallel
decoder creates, instead of random ones. ``--suffix-masks f`` (the same): a fraction f masks the end of the
response instead, so the first masked token has every token before it written. ``--grow-layers N`` and
``--grow-mlp W`` (the same) deepen or widen the ``--init`` checkpoint without changing what it computes, then
train on. ``examples/chain_sweep.py`` trains several seeds side by side and checks the chain yardstick on each.

Objective (masked diffusion, as LLaDA/Dream SFT): per sequence t ~ U(eps, 1] (stratified over the batch); every
response token (the answer, the end-of-turn token and the EOS padding up to 64 tokens) is replaced by MASK with
probability t; the prompt is never masked. Loss = sum over masked tokens of CE / t, divided by the number of
response tokens. Dream layout predicts token j from position j-1 (shifted, as the real Dream); LLaDA from j.

Data: ``dkvcache.tasks.arith``; training items come from the train split only (disjoint by content from the
held-out items).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

from dkvcache.tasks import arith, chain  # noqa: E402

TASKS = {"arith": arith, "chain": chain}  # --task: the module with the generator, split and scorer

# -- tokenizers --------------------------------------------------------------------------------------------------
# Special tokens mirror the real ones (names and overlaps): Dream bos = eos = pad = <|endoftext|>, its own
# <|mask|>; LLaDA eos = pad = <|endoftext|>, bos <|startoftext|>, mask <|mdm_mask|>, end of turn <|eot_id|>.
SPECIALS = {
    "dream": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>", "<|unk|>"],
    "llada": ["<|startoftext|>", "<|endoftext|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
              "<|mdm_mask|>", "<|unk|>"],
}
ROLES = {
    "dream": {"bos": "<|endoftext|>", "eos": "<|endoftext|>", "pad": "<|endoftext|>", "mask": "<|mask|>",
              "end_of_turn": "<|im_end|>"},
    "llada": {"bos": "<|startoftext|>", "eos": "<|endoftext|>", "pad": "<|endoftext|>", "mask": "<|mdm_mask|>",
              "end_of_turn": "<|eot_id|>"},
}
# The originals' chat templates (Qwen2.5's with its default system prompt for Dream; LLaDA-8B-Instruct's).
CHAT_TEMPLATES = {
    "dream": (
        "{% for message in messages %}"
        "{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llada": (
        "{% set loop_messages = messages %}{% for message in loop_messages %}"
        "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + "
        "message['content'] | trim + '<|eot_id|>' %}"
        "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
}


def build_tokenizer(arch: str, task=arith):
    """A word/character-level fast tokenizer: the task's words whole (see ``arith.WORDS`` / ``arith.FRUITS``), any
    other printable ASCII character as one token, so every text round-trips exactly."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    specials = SPECIALS[arch]
    pieces = list(specials) + ["\n", "\t"] + [chr(c) for c in range(32, 127)]
    bare = getattr(task, "FRUITS", ())  # words kept whole without a leading space (arith's fruits)
    for word in task.WORDS:
        pieces += [word, " " + word]
    pieces += list(bare)
    vocab = {p: i for i, p in enumerate(dict.fromkeys(pieces))}
    words = "|".join(sorted(task.WORDS, key=len, reverse=True))
    tok = Tokenizer(WordLevel(vocab, unk_token="<|unk|>"))
    pattern = rf" ?(?:{words})(?![A-Za-z])|[\s\S]"
    if bare:
        fruits = "|".join(sorted(bare, key=len, reverse=True))
        pattern = rf" ?(?:{words})(?![A-Za-z])|(?:{fruits})(?![A-Za-z])|[\s\S]"
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    roles = ROLES[arch]
    extra = [s for s in specials if s not in (roles["bos"], roles["eos"], roles["mask"], "<|unk|>")]
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=roles["bos"], eos_token=roles["eos"], pad_token=roles["pad"],
        mask_token=roles["mask"], unk_token="<|unk|>", additional_special_tokens=extra,
        chat_template=CHAT_TEMPLATES[arch], padding_side="left", model_max_length=2048,
        clean_up_tokenization_spaces=False)


def save_tokenizer(tokenizer, out: str) -> None:
    tokenizer.save_pretrained(out, save_jinja_files=False)
    path = os.path.join(out, "tokenizer_config.json")
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["chat_template"] = tokenizer.chat_template
    with open(path, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
        f.write("\n")


# -- model configs ----------------------------------------------------------------------------------------------
def padded_vocab(n: int, multiple: int = 32) -> int:
    return (n + multiple - 1) // multiple * multiple


def make_config(arch: str, tokenizer, args):
    ids = {role: tokenizer.convert_tokens_to_ids(tok) for role, tok in ROLES[arch].items()}
    vocab = padded_vocab(len(tokenizer))
    if arch == "dream":
        from models import DreamConfig

        return DreamConfig(
            vocab_size=vocab, hidden_size=args.hidden, intermediate_size=args.mlp or 4 * args.hidden,
            num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads or 2,
            max_position_embeddings=2048, max_window_layers=args.layers, rope_theta=args.rope_theta,
            rms_norm_eps=1e-6, tie_word_embeddings=False, use_sliding_window=False, sliding_window=None,
            mask_token_id=ids["mask"], bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"],
            architectures=["DreamModel"], initializer_range=0.02,
            auto_map={"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"})
    from models import LLaDAConfig

    return LLaDAConfig(
        d_model=args.hidden, n_heads=args.heads, n_kv_heads=args.kv_heads or args.heads, n_layers=args.layers,
        mlp_hidden_size=args.mlp or 4 * args.hidden, mlp_ratio=4, vocab_size=vocab, embedding_size=vocab,
        max_sequence_length=2048, rope_theta=args.rope_theta, rms_norm_eps=1e-5, weight_tying=False,
        mask_token_id=ids["mask"], eos_token_id=ids["eos"], pad_token_id=ids["pad"], bos_token_id=ids["bos"],
        architectures=["LLaDAModelLM"],
        auto_map={"AutoConfig": "configuration_llada.LLaDAConfig",
                  "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM", "AutoModel": "modeling_llada.LLaDAModelLM"})


def make_model(arch: str, config):
    from models import DreamModel, LLaDAModelLM

    model = DreamModel(config) if arch == "dream" else LLaDAModelLM(config)
    std = 0.02
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # norms start at 1, biases at 0
                p.fill_(1.0 if name.endswith("norm.weight") or ".ln_f." in name or "_norm." in name else 0.0)
            else:
                p.normal_(0.0, std)
    return model


def load_init(path: str, arch: str, tokenizer):
    """The checkpoint at ``path`` in float32, checked to be this --arch with this task's tokenizer."""
    from models import DreamModel, LLaDAModelLM

    cls = DreamModel if arch == "dream" else LLaDAModelLM
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    vocab = padded_vocab(len(tokenizer))
    if config.get("model_type") != cls.config_class.model_type or config.get("vocab_size") != vocab:
        raise SystemExit(f"--init {path}: a {config.get('model_type')!r} checkpoint with vocab "
                         f"{config.get('vocab_size')}, not --arch {arch} with this task's tokenizer (vocab {vocab})")
    return cls.from_pretrained(path, dtype=torch.float32)


# The projections that write a block's output into the residual stream: zeroed, a new block is the identity.
OUTPUT_PROJECTIONS = {"llada": ("attn_out", "ff_out"), "dream": ("self_attn.o_proj", "mlp.down_proj")}
LAYER_COUNT = {"llada": "n_layers", "dream": "num_hidden_layers"}


def grow_layers(model, arch: str, extra: int):
    """``model`` deepened by ``extra`` blocks, one inserted after each of its first ``extra`` blocks and
    initialised as the identity (random weights, zero output projections): the grown model computes exactly
    what ``model`` did, and training goes on from there (depth up-scaling)."""
    old = model._layers()
    if not 0 < extra <= len(old):
        raise SystemExit(f"--grow-layers must be in [1, {len(old)}] for a {len(old)}-layer --init, got {extra}")
    config = copy.deepcopy(model.config)
    setattr(config, LAYER_COUNT[arch], len(old) + extra)
    if arch == "dream":
        config.max_window_layers = len(old) + extra
    grown = make_model(arch, config).to(next(model.parameters()).dtype)
    order = [source for i in range(len(old)) for source in ([i, None] if i < extra else [i])]
    in_layers = {id(p) for p in grown._layers().parameters()}
    old_params = dict(model.named_parameters())
    with torch.no_grad():
        for name, param in grown.named_parameters():
            if id(param) not in in_layers:
                param.copy_(old_params[name])
        for block, source in zip(grown._layers(), order, strict=True):
            if source is not None:
                block.load_state_dict(old[source].state_dict())
            else:
                for name in OUTPUT_PROJECTIONS[arch]:
                    block.get_submodule(name).weight.zero_()
    return grown


MLP_WIDTH = {"llada": "mlp_hidden_size", "dream": "intermediate_size"}
MLP_OUTPUTS = {arch: names[1] for arch, names in OUTPUT_PROJECTIONS.items()}  # the MLP's output projection


def grow_mlp(model, arch: str, width: int):
    """``model`` with every block's MLP widened to ``width`` units: the old units keep their weights, the new ones
    get random input weights and zero output weights, so the grown model computes exactly what ``model`` did
    (width up-scaling; more room for the lookup tables a block applies)."""
    old_width = getattr(model.config, MLP_WIDTH[arch])
    if width <= old_width:
        raise SystemExit(f"--grow-mlp must exceed the --init checkpoint's MLP width {old_width}, got {width}")
    config = copy.deepcopy(model.config)
    setattr(config, MLP_WIDTH[arch], width)
    grown = make_model(arch, config).to(next(model.parameters()).dtype)
    old_params = dict(model.named_parameters())
    with torch.no_grad():
        for name, param in grown.named_parameters():
            old = old_params[name]
            if param.shape == old.shape:
                param.copy_(old)
                continue
            if name.endswith(f"{MLP_OUTPUTS[arch]}.weight"):  # (d, width): the new units write nothing
                param.zero_()
            param[tuple(slice(0, n) for n in old.shape)] = old
    return grown


def generation_config(arch: str, config, gen_length: int = arith.GEN_LENGTH) -> dict:
    if arch == "dream":
        return {"alg": "entropy", "alg_temp": None, "bos_token_id": config.bos_token_id,
                "eos_token_id": config.eos_token_id, "eps": 0.001, "mask_token_id": config.mask_token_id,
                "max_new_tokens": gen_length, "pad_token_id": config.pad_token_id, "steps": gen_length,
                "temperature": 0.0, "top_k": None, "top_p": None}
    return {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
            "pad_token_id": config.pad_token_id}


# -- data --------------------------------------------------------------------------------------------------------
class Encoder:
    """Prompt ids (chat template applied) and fixed-length response ids (answer, end of turn, EOS padding)."""

    def __init__(self, tokenizer, arch: str, gen_length: int) -> None:
        self.tokenizer, self.gen_length = tokenizer, gen_length
        self.eos = tokenizer.convert_tokens_to_ids(ROLES[arch]["eos"])
        self.end_of_turn = tokenizer.convert_tokens_to_ids(ROLES[arch]["end_of_turn"])
        self.pad = tokenizer.convert_tokens_to_ids(ROLES[arch]["pad"])

    def prompts(self, questions):
        texts = arith.chat_prompts(self.tokenizer, questions)
        return [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]

    def response(self, answer: str) -> list[int]:
        ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"] + [self.end_of_turn]
        if len(ids) > self.gen_length:
            raise ValueError(f"answer of {len(ids)} tokens does not fit gen_length={self.gen_length}: {answer!r}")
        return ids + [self.eos] * (self.gen_length - len(ids))

    def batch(self, items):
        prompts = self.prompts([it.question for it in items])
        width = max(len(p) for p in prompts)
        ids = torch.full((len(items), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        response = torch.tensor([self.response(it.answer) for it in items], dtype=torch.long)
        return ids, mask, response


def _response_logits(model, arch: str, prompt_ids, prompt_mask, noisy):
    """Logits predicting each response token (Dream: position j-1 predicts token j; LLaDA: position j)."""
    width, length = prompt_ids.shape[1], noisy.shape[1]
    x = torch.cat([prompt_ids, noisy], dim=1)
    attn = torch.cat([prompt_mask, torch.ones_like(noisy)], dim=1)
    logits = model(x, attention_mask=attn).logits
    return logits[:, width - 1: width - 1 + length] if arch == "dream" else logits[:, width:]


def confidence_order_masks(model, arch: str, prompt_ids, prompt_mask, response, mask_id: int,
                           count: torch.Tensor) -> torch.Tensor:
    """Masks shaped like the ones decoding visits: keep the tokens the model is most confident about with the whole
    response masked (what confidence-ordered decoding commits first) and mask the ``count`` least confident.

    Random masks rarely show a state the model must compute while everything it can copy is already written,
    which is what a parallel decoder creates after its first step; training on these contexts teaches the model
    its confidence there (measured: the 3-layer chain LLaDA was ~93 % confident and ~55 % right three states
    ahead of the last written one)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        blank = torch.full_like(response, mask_id)
        conf = _response_logits(model, arch, prompt_ids, prompt_mask, blank).float().softmax(-1).amax(-1)
    model.train(was_training)
    ranks = conf.argsort(dim=1).argsort(dim=1)  # 0 = least confident
    return ranks < count.to(ranks.device)[:, None]


def diffusion_loss(model, arch: str, prompt_ids, prompt_mask, response, mask_id: int, gen: torch.Generator,
                   eps: float = 1e-3, objective: str = "bernoulli", confidence_masks: float = 0.0,
                   suffix_masks: float = 0.0):
    """Masked-diffusion loss of one batch (see the module docstring). Returns (loss, mean CE on masked tokens).

    ``objective="bernoulli"``: t ~ U(eps, 1], each response token masked with probability t, CE weighted 1/t.
    ``objective="exact"``: l ~ U{1..R}, exactly l of the R response tokens masked, CE weighted R/l -- the same
    bound in expectation (LLaDA's low-variance form) without the binomial noise in the number masked.
    ``suffix_masks=f``: in a fraction f of the rows (the last ones) the masked tokens are instead the last ones of
    the response, as many as the row's draw asked for: everything before the first masked token is written, the
    context left-to-right decoding sees (an experiment, measured and not adopted: docs/accuracy.md).
    ``confidence_masks=f``: in a fraction f of the rows (the first ones after the shuffle) the masked tokens are
    instead the least confident ones (``confidence_order_masks``), as many as the row's draw asked for.
    """
    batch = prompt_ids.shape[0]
    length = response.shape[1]
    # stratified draws: one uniform, spread over the batch (lower variance than independent draws)
    u = (torch.rand((), generator=gen) + torch.arange(batch) / batch) % 1.0
    u = u[torch.randperm(batch, generator=gen)]
    if objective == "bernoulli":
        t = eps + (1 - eps) * u
        masked = torch.rand(response.shape, generator=gen) < t[:, None]
    elif objective == "exact":
        count = 1 + (u * length).long().clamp(max=length - 1)
        ranks = torch.rand(response.shape, generator=gen).argsort(dim=1).argsort(dim=1)
        masked = ranks < count[:, None]
        t = count.double() / length
    else:
        raise ValueError(f"objective must be 'bernoulli' or 'exact', got {objective!r}")
    masked, t = masked.to(response.device), t.to(response.device)  # CPU draws: the same masks on any device
    rows = round(confidence_masks * batch)
    if rows:
        count = masked[:rows].sum(dim=1).clamp(min=1)
        masked[:rows] = confidence_order_masks(model, arch, prompt_ids[:rows], prompt_mask[:rows], response[:rows],
                                               mask_id, count)
    suffix_rows = round(suffix_masks * batch)
    if suffix_rows:  # the last rows: the row's number of masked tokens, all at the end of the response
        count = masked[batch - suffix_rows:].sum(dim=1, keepdim=True).clamp(min=1)
        back = torch.arange(length - 1, -1, -1, device=masked.device)  # tokens after each position
        masked[batch - suffix_rows:] = back[None, :] < count
    noisy = torch.where(masked, torch.full_like(response, mask_id), response)
    pred = _response_logits(model, arch, prompt_ids, prompt_mask, noisy)
    ce = F.cross_entropy(pred.reshape(-1, pred.shape[-1]).float(), response.reshape(-1), reduction="none")
    ce = ce.view_as(response)
    loss = (ce * masked / t[:, None].float()).sum() / response.numel()
    return loss, (ce * masked).sum() / masked.sum().clamp(min=1)


def autoregressive_loss(model, prompt_ids, prompt_mask, response):
    """Next-token loss with causal attention (mean CE over the response): the real Dream starts from an
    autoregressive LM (Qwen2.5), and its shifted layout (position j-1 predicts token j) is exactly that LM's."""
    width = prompt_ids.shape[1]
    x = torch.cat([prompt_ids, response], dim=1)
    valid = torch.cat([prompt_mask, torch.ones_like(response)], dim=1).bool()
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device).tril()[None]
    hidden = model.partial_forward(x, positions, valid, extra_mask=causal)
    pred = model.logits_from_hidden(hidden[:, width - 1: -1])
    ce = F.cross_entropy(pred.reshape(-1, pred.shape[-1]).float(), response.reshape(-1))
    return ce, ce


# -- main --------------------------------------------------------------------------------------------------------
DEFAULTS = {  # per architecture; the shipped checkpoints add --device cuda --steps 7000
    "dream": {"hidden": 128, "layers": 4, "heads": 4, "kv_heads": 2, "steps": 3000},
    "llada": {"hidden": 128, "layers": 4, "heads": 4, "kv_heads": None, "steps": 3000},
}


# per task, over the per-architecture ones; chain: the CPU recipe of the shipped chain checkpoints (3 layers: faster
# steps, and a shallower model composes fewer moves in one forward)
TASK_DEFAULTS = {"arith": {"lr": 1e-3}, "chain": {"layers": 3, "lr": 2e-3, "steps": 4000}}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", required=True, choices=["dream", "llada"])
    ap.add_argument("--out", required=True, help="checkpoint directory to write")
    ap.add_argument("--task", choices=sorted(TASKS), default="arith",
                    help="the synthetic task to train on (dkvcache.tasks.<task>; default arith)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (default: per-arch, see DEFAULTS)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1e-3; chain 2e-3)")
    ap.add_argument("--objective", choices=["bernoulli", "exact"], default="bernoulli",
                    help="how the masks are drawn (see diffusion_loss)")
    ap.add_argument("--confidence-masks", type=float, default=0.0,
                    help="fraction of each batch masked least-confident-first instead of at random "
                         "(see confidence_order_masks)")
    ap.add_argument("--ar-steps", type=int, default=0,
                    help="Dream only: the first N of --steps train an autoregressive LM (causal attention, "
                         "next-token loss), the rest the diffusion loss: the real Dream's AR initialisation")
    ap.add_argument("--suffix-masks", type=float, default=0.0,
                    help="fraction of each batch whose masks are a suffix of the response (as many tokens as the "
                         "row's draw): the written-prefix contexts decoding visits (see diffusion_loss)")
    ap.add_argument("--init", default=None,
                    help="continue from this checkpoint directory (same --arch and --task; its config replaces "
                         "--hidden/--layers/...; a fresh optimizer and LR schedule; pick a new --seed for new data)")
    ap.add_argument("--grow-layers", type=int, default=0,
                    help="with --init: insert this many identity-initialised blocks (one after each of the first "
                         "N blocks) before training on")
    ap.add_argument("--grow-mlp", type=int, default=0,
                    help="widen every MLP of the --init checkpoint to this many units, function-preserving")
    ap.add_argument("--min-lr-ratio", type=float, default=0.05)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--hidden", type=int, default=None)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--heads", type=int, default=None)
    ap.add_argument("--kv-heads", type=int, default=None)
    ap.add_argument("--mlp", type=int, default=None, help="MLP width (default 4 * hidden)")
    ap.add_argument("--rope-theta", type=float, default=10000.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu (the documented budget) or cuda for quick sweeps")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--eval-limit", type=int, default=None, help="held-out items to score at the end (default all)")
    ap.add_argument("--eval-batch-size", type=int, default=100)
    ap.add_argument("--no-eval", action="store_true")
    ap.add_argument("--monitor-every", type=int, default=0,
                    help="every N steps, decode --monitor-items fresh *train-split* items (vanilla) and log accuracy")
    ap.add_argument("--monitor-items", type=int, default=32)
    args = ap.parse_args(argv)
    for key, value in {**DEFAULTS[args.arch], **TASK_DEFAULTS.get(args.task, {})}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.ar_steps and args.arch != "dream":
        ap.error("--ar-steps needs --arch dream (LLaDA predicts token j from position j: no AR layout)")
    if args.init is not None and not os.path.isfile(os.path.join(args.init, "config.json")):
        ap.error(f"--init must be a checkpoint directory with a config.json, got {args.init!r}")
    if args.grow_layers and args.init is None:
        ap.error("--grow-layers deepens the --init checkpoint; pass --init")
    if args.grow_mlp and args.init is None:
        ap.error("--grow-mlp widens the --init checkpoint; pass --init")
    if not 0.0 <= args.confidence_masks <= 1.0:
        ap.error(f"--confidence-masks must be a fraction in [0, 1], got {args.confidence_masks}")
    if not 0.0 <= args.suffix_masks <= 1.0:
        ap.error(f"--suffix-masks must be a fraction in [0, 1], got {args.suffix_masks}")
    if not 0 <= args.ar_steps < args.steps:
        ap.error(f"--ar-steps must be in [0, --steps={args.steps}), got {args.ar_steps}")
    return args


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    ratio = args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return args.lr * ratio


def train(args) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)

    import models  # noqa: F401  (Auto registrations)

    task = TASKS[args.task]
    tokenizer = build_tokenizer(args.arch, task)
    if args.init is not None:
        model = load_init(args.init, args.arch, tokenizer)
        if args.grow_layers:
            model = grow_layers(model, args.arch, args.grow_layers)
        if args.grow_mlp:
            model = grow_mlp(model, args.arch, args.grow_mlp)
        model = model.to(args.device)
        config = model.config
    else:
        config = make_config(args.arch, tokenizer, args)
        model = make_model(args.arch, config).to(args.device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.arch}: {n_params / 1e6:.2f}M parameters, vocab {config.vocab_size} "
          f"(tokenizer {len(tokenizer)}), {args.steps} steps x {args.batch_size}", flush=True)
    encoder = Encoder(tokenizer, args.arch, task.GEN_LENGTH)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98), eps=1e-8)
    log_path = os.path.join(args.out, "train_log.jsonl")
    log = open(log_path, "w", encoding="utf-8")
    start = time.perf_counter()
    model.train()
    run_loss = run_ce = 0.0
    bar = tqdm(range(args.steps), desc=f"train {args.arch}", unit="step", mininterval=2.0)
    for step in bar:
        lr = lr_at(step, args)
        for group in opt.param_groups:
            group["lr"] = lr
        items = [task.sample_item(rng, "train") for _ in range(args.batch_size)]
        prompt_ids, prompt_mask, response = (t.to(args.device) for t in encoder.batch(items))
        if step < args.ar_steps:
            loss, ce = autoregressive_loss(model, prompt_ids, prompt_mask, response)
        else:
            loss, ce = diffusion_loss(model, args.arch, prompt_ids, prompt_mask, response, config.mask_token_id,
                                      gen, objective=args.objective, confidence_masks=args.confidence_masks,
                                      suffix_masks=args.suffix_masks)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        run_loss += loss.item()
        run_ce += ce.item()
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            k = (step % args.log_every) + 1
            record = {"step": step + 1, "stage": "ar" if step < args.ar_steps else "diffusion",
                      "loss": run_loss / k, "masked_ce": run_ce / k, "lr": lr,
                      "elapsed_s": round(time.perf_counter() - start, 1)}
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{record['loss']:.4f}", ce=f"{record['masked_ce']:.4f}")
            run_loss = run_ce = 0.0
        if args.monitor_every and (step + 1) % args.monitor_every == 0 and step + 1 < args.steps:
            acc = monitor(model, tokenizer, args)
            log.write(json.dumps({"step": step + 1, "monitor_accuracy": acc}) + "\n")
            log.flush()
            tqdm.write(f"step {step + 1}: vanilla accuracy on {args.monitor_items} train-split items {acc:.3f}")
            model.train()
    log.close()
    train_s = time.perf_counter() - start
    print(f"training: {train_s:.0f} s", flush=True)

    model.eval()
    model.to("cpu", torch.bfloat16).save_pretrained(args.out, safe_serialization=True)
    save_tokenizer(tokenizer, args.out)
    with open(os.path.join(args.out, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump(generation_config(args.arch, config, task.GEN_LENGTH), f, indent=2, sort_keys=True)
        f.write("\n")
    result = {"train_s": train_s, "params": n_params}
    if not args.no_eval:
        result.update(evaluate_checkpoint(args.out, args.eval_limit, args.eval_batch_size, args.device, task))
    result["total_s"] = time.perf_counter() - start
    print(f"total wall time: {result['total_s']:.0f} s", flush=True)
    return result


def monitor(model, tokenizer, args) -> float:
    """Accuracy on fresh train-split items (never the held-out ones), from an RNG independent of training."""
    rng = random.Random(10_000 + args.seed)
    task = TASKS[args.task]
    items = [task.sample_item(rng, "train") for _ in range(args.monitor_items)]
    rows = [{"question": it.question, "answer": it.answer} for it in items]
    model.eval()
    kwargs = task.default_generation_kwargs(args.arch)
    return task.evaluate(model, tokenizer, rows, batch_size=args.monitor_items, **kwargs)["accuracy"]


def evaluate_checkpoint(path: str, limit=None, batch_size: int = 100, device: str = "cpu", task=arith) -> dict:
    """Reload the saved (bf16) checkpoint in float32 and score the held-out items with vanilla decoding."""
    model, tokenizer = arith.load_model(path, "float32", device)
    rows = task.load_jsonl(task.DATA_PATH, limit)
    kwargs = task.default_generation_kwargs(model.diffusion_family)
    res = task.evaluate(model, tokenizer, rows, batch_size=batch_size, **kwargs)
    print(f"held-out accuracy (vanilla {kwargs}): {100 * res['accuracy']:.1f} % ({res['correct']}/{res['n']}), "
          f"tokens/forward {res['tokens_per_forward']:.3f}, tokens/s {res['tokens_per_s']:.1f}", flush=True)
    bad = [p for p in res["predictions"] if not p["correct"]][:3]
    for p in bad:
        print(f"  wrong: {p['question']!r} -> {p['prediction']!r}")
    return {"accuracy": res["accuracy"], "n": res["n"]}


def main(argv=None) -> int:
    train(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())

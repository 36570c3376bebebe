"""Drop-in Dream and LLaDA model classes. Importing this package registers them with the Auto classes, so
``AutoModel.from_pretrained(dir)`` / ``AutoTokenizer.from_pretrained(dir)`` work without ``trust_remote_code``
(also when config.json carries the original ``auto_map``)."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from models.configuration_dream import DreamConfig
from models.configuration_llada import LLaDAConfig
from models.modeling_dream import DreamModel
from models.modeling_llada import LLaDAModelLM
from models.tokenization_dream import DreamTokenizer


def _register() -> None:
    AutoConfig.register(DreamConfig.model_type, DreamConfig, exist_ok=True)
    AutoConfig.register(LLaDAConfig.model_type, LLaDAConfig, exist_ok=True)
    for auto in (AutoModel, AutoModelForCausalLM):
        auto.register(DreamConfig, DreamModel, exist_ok=True)
        auto.register(LLaDAConfig, LLaDAModelLM, exist_ok=True)
    AutoTokenizer.register(DreamConfig, fast_tokenizer_class=DreamTokenizer, exist_ok=True)
    AutoTokenizer.register(LLaDAConfig, fast_tokenizer_class=PreTrainedTokenizerFast, exist_ok=True)


_register()

__all__ = ["DreamConfig", "DreamModel", "DreamTokenizer", "LLaDAConfig", "LLaDAModelLM"]

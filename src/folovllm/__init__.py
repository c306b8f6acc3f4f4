"""FoloVLLM: a teaching LLM inference engine in the shape of vLLM v1."""

from folovllm.config import EngineConfig
from folovllm.entrypoints.llm import LLM
from folovllm.exceptions import InvalidTypeError
from folovllm.outputs import CompletionOutput, RequestOutput
from folovllm.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "EngineConfig", "InvalidTypeError"]
__version__ = "0.3.0"

"""hotlora's engine: the frozen base model, resident adapters and batched generation."""

from server.engine.config import EngineConfig
from server.engine.engine import Engine
from server.engine.errors import EngineError, ModelLoadError, RequestError
from server.engine.outputs import GenerationOutput, StepOutput
from server.engine.sampling import SamplingParams

__all__ = [
    "Engine",
    "EngineConfig",
    "EngineError",
    "GenerationOutput",
    "ModelLoadError",
    "RequestError",
    "SamplingParams",
    "StepOutput",
]

"""hotlora's engine: the frozen base model, resident adapters and batched generation."""

from hotlora.server.engine.config import EngineConfig
from hotlora.server.engine.engine import Engine
from hotlora.server.engine.errors import EngineError, ModelLoadError, RequestError
from hotlora.server.engine.outputs import GenerationOutput, StepOutput
from hotlora.server.engine.sampling import SamplingParams

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

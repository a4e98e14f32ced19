"""The engine: scheduler, model runner and sampler, wired together by LLMEngine.

Submodules are imported where needed (``pagedserve.engine.model_runner`` pulls in torch
and the model code; the scheduler side does not need it).
"""

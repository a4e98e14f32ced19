"""The engine: requests, scheduling, outputs, wired together by LLMEngine; a step runs
on the device through pagedserve.runner.

Submodules are imported where needed (``pagedserve.runner.model_runner`` pulls in torch
and the model code; the scheduler side does not need it).
"""

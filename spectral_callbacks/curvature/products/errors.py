"""Why a loss has no Hessian-vector product by autograd, in words a user can act on."""

from __future__ import annotations

import re

__all__ = ["NoSecondDerivative", "explain_second_order_failure", "raise_second_order"]


class NoSecondDerivative(Exception):
    """The loss has no double backward; ``explained`` says which op and what to do."""

    def __init__(self, explained: RuntimeError, original: BaseException | None) -> None:
        super().__init__(str(explained))
        self.explained = explained
        self.original = original


def raise_second_order(error: RuntimeError) -> None:
    """Re-raise ``error``, as :class:`NoSecondDerivative` when an op lacks a second
    derivative (so ``hvp="auto"`` can switch to gradient differences)."""
    explained = explain_second_order_failure(error)
    if explained is not None:
        raise NoSecondDerivative(explained, error) from error
    raise error


def explain_second_order_failure(error: RuntimeError) -> RuntimeError | None:
    """A clearer error for an op without a second derivative (or forward-mode AD), or
    ``None`` when ``error`` is not about one."""
    text = str(error)
    if "once_differentiable" in text:
        return RuntimeError(
            "the loss runs through a custom autograd.Function whose backward is marked "
            "@once_differentiable, so it has no double backward: use "
            f"hvp='gradient_difference' (products from gradients alone). (original error: {text})"
        )
    if "use_reentrant=True" in text and "checkpoint" in text:
        return RuntimeError(
            "the loss runs through torch.utils.checkpoint with use_reentrant=True, whose "
            "backward cannot be differentiated again: checkpoint with use_reentrant=False "
            "(Hugging Face: gradient_checkpointing_kwargs={'use_reentrant': False}, the default "
            "of transformers 5), or use hvp='gradient_difference' (products from gradients "
            f"alone). (original error: {text})"
        )
    if "does not currently support double backward" in text:
        return RuntimeError(
            "the loss runs through a torch.compile'd module or function, and compiled graphs "
            "have no double backward. Measurements run compiled code eagerly with "
            "torch.compiler.set_stance('force_eager'), which needs PyTorch >= 2.6; on older "
            "versions pass the uncompiled model (compiled modules keep it as `_orig_mod`) or "
            f"use hvp='forward_over_reverse'. (original error: {text})"
        )
    match = re.search(r"derivative for (\S+) is not implemented", text)
    if match is None:
        return None
    op = match.group(1)
    hint = (
        "Hessian-vector products need the double backward (or forward-mode AD) of every op in "
        "the loss."
    )
    if "rnn" in op.lower() or "cudnn" in op.lower() or "lstm" in op.lower():
        hint += (
            " cuDNN's fused RNN kernels have none: measure with cuDNN disabled, e.g. "
            "`with torch.backends.cudnn.flags(enabled=False): ...`, or use an RNN written with "
            "nn.LSTMCell / nn.GRUCell."
        )
    elif "attention" in op.lower():
        hint += (
            " Attention is already forced to the math kernel; this op is called another way "
            "(a custom kernel?): replace it by torch.nn.functional.scaled_dot_product_attention."
        )
    hint += " hvp='gradient_difference' needs first-order gradients only."
    return RuntimeError(f"cannot differentiate {op} twice: {hint} (original error: {text})")
